"""``python -m bench.profile FILE [--top N]``: read a py-spy collapsed-stack file (``--profile``)
and print where the samples are: by thread, by file and by own frame (self time), and by any frame on
the stack (total)."""

from __future__ import annotations

import argparse
import sys
from collections import Counter
from pathlib import Path


def parse(text: str) -> list[tuple[list[str], int]]:
    """Lines ``frame;frame;frame COUNT`` -> (frames outermost first, count)."""
    stacks = []
    for line in text.splitlines():
        stack, _, count = line.rpartition(" ")
        if stack and count.isdigit():
            stacks.append((stack.split(";"), int(count)))
    return stacks


def short(frame: str) -> str:
    """``send_frame (aiohttp/_websocket/writer.py:123)`` -> ``send_frame (aiohttp/_websocket/writer.py)``"""
    name, _, where = frame.partition(" (")
    where = where.rstrip(")")
    path = where.rsplit(":", 1)[0]
    for marker in ("site-packages/", "/work/main/", "lib/python3.11/"):
        if marker in path:
            path = path.split(marker, 1)[1]
    return f"{name} ({path})" if path else name


def split_thread(frames: list[str]) -> tuple[str, list[str]]:
    """py-spy ``--threads`` puts ``thread (0x..)`` first: (thread name, the rest)."""
    if frames and frames[0].startswith(("thread (", "process ")):
        name = frames[0]
        rest = frames[1:]
        if rest and rest[0].startswith("thread ("):
            name, rest = rest[0], rest[1:]
        return name, rest
    return "", frames


def summarize(stacks: list[tuple[list[str], int]], top: int = 25) -> str:
    total = sum(count for _, count in stacks) or 1
    own: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    by_file: Counter[str] = Counter()
    threads: Counter[str] = Counter()
    for frames, count in stacks:
        _, frames = split_thread(frames)
        if not frames:
            continue
        # thread pool frames run under concurrent.futures' _worker; everything else is the event loop
        # (py-spy --nonblocking sometimes cuts a stack short, so its root is not always run_app)
        threads["worker threads (to_thread)" if any(f.startswith("_worker (") for f in frames)
                else "event loop"] += count
        leaf = short(frames[-1])
        own[leaf] += count
        by_file[leaf.partition(" (")[2].rstrip(")") or "?"] += count
        for frame in {short(f) for f in frames}:
            inclusive[frame] += count
    lines = [f"{total} samples", "", f"{'%':>7}  thread"]
    lines += [f"{100 * n / total:6.1f}%  {name}" for name, n in threads.most_common()]
    lines += ["", f"{'self %':>7}  file"]
    lines += [f"{100 * n / total:6.1f}%  {name}" for name, n in by_file.most_common(top)]
    lines += ["", f"{'self %':>7}  function"]
    lines += [f"{100 * n / total:6.1f}%  {name}" for name, n in own.most_common(top)]
    lines += ["", f"{'total %':>7}  function"]
    lines += [f"{100 * n / total:6.1f}%  {name}" for name, n in inclusive.most_common(top)]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.profile")
    parser.add_argument("file", type=Path)
    parser.add_argument("--top", type=int, default=25)
    args = parser.parse_args(argv)
    print(summarize(parse(args.file.read_text()), args.top))
    return 0


if __name__ == "__main__":
    sys.exit(main())
