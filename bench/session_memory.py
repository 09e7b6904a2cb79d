"""``python -m bench.session_memory [--sessions N] [--trace]``: where the bytes of one idle session go.

The idle workload gives one number (server RSS growth per session); this says what it is made of.
The server runs in this process (``build_app``, on a real port, uvloop like ``agentchat serve``); a
client process (``bench.sessions``) opens ``--warmup`` sessions, then ``--sessions`` more, each
authenticated with ``hello``. Between the two, per added session:

- RSS growth (what the idle workload measures);
- objects the garbage collector tracks, by type (count and shallow size);
- with ``--trace``: tracemalloc's bytes by owner (the innermost frame's package: agentchat, aiohttp,
  the event loop's C code, ...), by line, and the largest tracebacks.

tracemalloc doubles RSS while it runs, so RSS is only meaningful without ``--trace``; its byte counts
match RSS within a few percent (pymalloc adds little; blocks over 512 bytes go to malloc with a small
header). Objects that CPython keeps on free lists (dicts, lists, tuples, floats) are charged to the
line that first allocated their block, which may be another owner's.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import subprocess
import sys
import tempfile
import tracemalloc
from collections import Counter
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
AGENTS = 200  # sessions share tokens the way the idle workload's do (several per agent)


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def objects_by_type() -> tuple[Counter[str], Counter[str]]:
    counts: Counter[str] = Counter()
    sizes: Counter[str] = Counter()
    for obj in gc.get_objects():
        kind = type(obj)
        name = f"{kind.__module__}.{kind.__qualname__}"
        counts[name] += 1
        sizes[name] += sys.getsizeof(obj)
    return counts, sizes


def owner(filename: str) -> str:
    """Who a traced allocation belongs to, by the file of its innermost Python frame."""
    for marker, name in (("/agentchat/", "agentchat"), ("/aiohttp/", "aiohttp"), ("/multidict/", "aiohttp"),
                         ("/yarl/", "aiohttp"), ("/jwt/", "pyjwt")):
        if marker in filename:
            return name
    if filename.endswith("asyncio/runners.py"):
        return "event loop (C: uvloop transports and handles)"
    return "stdlib " + filename.rsplit("/", 1)[-1]


def where(frame: tracemalloc.Frame) -> str:
    path = frame.filename
    for marker in ("site-packages/", "/work/main/", "lib/python3.11/"):
        if marker in path:
            path = path.split(marker, 1)[1]
    return f"{path}:{frame.lineno}"


def report(sessions: int, rss: int, before: tuple[Counter[str], Counter[str]],
           after: tuple[Counter[str], Counter[str]], snapshots: tuple[Any, Any] | None) -> None:
    print(f"RSS growth per session: {rss / sessions:,.0f} B" + (" (tracemalloc on: not meaningful)" if snapshots else ""))
    print("\ngarbage-collected objects per session (shallow bytes, count):")
    rows = []
    for name in set(before[0]) | set(after[0]):
        count = (after[0][name] - before[0][name]) / sessions
        if abs(count) >= 0.05:
            rows.append(((after[1][name] - before[1][name]) / sessions, count, name))
    for size, count, name in sorted(rows, reverse=True):
        print(f"  {size:7,.0f} B {count:6.2f}  {name}")
    print(f"  {sum(row[0] for row in rows):7,.0f} B in all")
    if snapshots is None:
        return
    first, second = (s.filter_traces([tracemalloc.Filter(False, tracemalloc.__file__)]) for s in snapshots)
    by_file = second.compare_to(first, "filename")
    print(f"\ntracemalloc: {sum(s.size_diff for s in by_file) / sessions:,.0f} B per session, by owner:")
    owners: Counter[str] = Counter()
    for stat in by_file:
        owners[owner(stat.traceback[0].filename)] += stat.size_diff
    for name, size in owners.most_common():
        print(f"  {size / sessions:7,.0f} B  {name}")
    print("\nby line (innermost frame):")
    for stat in second.compare_to(first, "lineno")[:60]:
        if abs(stat.size_diff) / sessions >= 16:
            print(f"  {stat.size_diff / sessions:7,.0f} B {stat.count_diff / sessions:6.2f}  {where(stat.traceback[0])}")
    print("\nlargest tracebacks (innermost last):")
    for stat in second.compare_to(first, "traceback")[:25]:
        if abs(stat.size_diff) / sessions >= 64:
            print(f"  {stat.size_diff / sessions:,.0f} B in {stat.count_diff / sessions:.2f} blocks")
            for frame in list(stat.traceback)[-5:]:
                if not frame.filename.endswith(("asyncio/runners.py", "session_memory.py", "runpy>")):
                    print(f"      {where(frame)}")


async def measure(sessions: int, warmup: int, trace: bool) -> None:
    from aiohttp import web

    from agentchat import crypto
    from agentchat.config import load_settings
    from agentchat.server.app import build_app
    from agentchat.server.appkeys import METRICS, TOKENS
    from agentchat.server.connections import AgentChatRunner

    with tempfile.TemporaryDirectory() as data:
        app = build_app(load_settings(env={}, store=f"file://{data}/data", token_secret="s" * 40))
        runner = AgentChatRunner(app, access_log=None)  # as agentchat serve
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        url = f"ws://127.0.0.1:{runner.addresses[0][1]}/api/v1/ws"
        tokens = [app[TOKENS].issue("agent", crypto.AgentKeys.generate().did)[0] for _ in range(AGENTS)]
        clients = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "bench.session_memory", "--clients", cwd=REPO,
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, limit=1 << 24)
        assert clients.stdin is not None and clients.stdout is not None

        async def hold(count: int) -> None:
            command = {"url": url, "tokens": [tokens[i % AGENTS] for i in range(count)]}
            clients.stdin.write(json.dumps(command).encode() + b"\n")
            await clients.stdin.drain()
            answer = json.loads(await clients.stdout.readline())
            if answer.get("error"):
                raise SystemExit(f"clients: {answer['error']}")

        try:
            await hold(warmup)
            await asyncio.sleep(1.0)
            if trace:
                tracemalloc.start(12)
            gc.collect()
            rss = rss_bytes()
            first = tracemalloc.take_snapshot() if trace else None
            before = objects_by_type()
            await hold(sessions)
            await asyncio.sleep(2.0)
            gc.collect()
            rss = rss_bytes() - rss
            after = objects_by_type()
            second = tracemalloc.take_snapshot() if trace else None
            print(f"{app[METRICS].sessions:,} sessions open ({warmup:,} warm-up), loop "
                  f"{type(asyncio.get_running_loop()).__module__}")
            report(sessions, rss, before, after, (first, second) if trace else None)
        finally:
            clients.stdin.close()
            await clients.wait()
            await runner.cleanup()


async def hold_sessions() -> None:
    """The client process: each stdin line ``{"url": ..., "tokens": [...]}`` opens one session per
    token and answers ``{"held": N}``; the sessions stay open until stdin closes."""
    from bench.sessions import open_session

    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader(limit=1 << 24)
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    held: list[Any] = []
    limit = asyncio.Semaphore(100)

    async def one(url: str, token: str) -> Any:
        async with limit:
            session, _ = await open_session("agentchat", url, {"token": token}, None)
            return session

    while line := await reader.readline():
        command = json.loads(line)
        try:
            held += await asyncio.gather(*(one(command["url"], t) for t in command["tokens"]))
            print(json.dumps({"held": len(held)}), flush=True)
        except Exception as exc:  # the measuring process reports it
            print(json.dumps({"error": repr(exc)[:300]}), flush=True)
    for session in held:
        session.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.session_memory", description=__doc__.split("\n")[0])
    parser.add_argument("--sessions", type=int, default=2000, help="sessions measured (default 2000)")
    parser.add_argument("--warmup", type=int, default=200, help="sessions opened first, not measured")
    parser.add_argument("--trace", action="store_true", help="tracemalloc by owner, line and traceback")
    parser.add_argument("--asyncio", action="store_true", help="the default event loop instead of uvloop")
    parser.add_argument("--clients", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.clients:
        asyncio.run(hold_sessions())
        return 0
    if not args.asyncio:
        import uvloop

        uvloop.install()
    asyncio.run(measure(args.sessions, args.warmup, args.trace))
    return 0


if __name__ == "__main__":
    sys.exit(main())
