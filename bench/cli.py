"""``python -m bench run <workload> [--server ...]``: run workloads, print the table, save the files.

    python -m bench run fanout                      # AgentChat and every peer, saturated fan-out
    python -m bench run all --duration 10           # every workload
    python -m bench run paced --rate 90000 --server agentchat,node-ws
    python -m bench run fanout --server agentchat --url ws://127.0.0.1:8080   # a server you run

Results go to ``bench/results/<time>/`` (results.json, results.md, chart.png); ``--publish`` also
copies the table and chart to ``bench/latest.md`` and ``bench/latest.png`` for the README.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

from bench import report, servers
from bench.workloads import ALL_WORKLOADS, PEER_WORKLOADS, WORKLOADS, Options

RESULTS = servers.BENCH_DIR / "results"


def parse_servers(text: str) -> list[str]:
    if text == "all":
        return list(servers.SERVERS)
    names = [name.strip() for name in text.split(",") if name.strip()]
    unknown = [name for name in names if name not in servers.SERVERS]
    if unknown or not names:
        raise argparse.ArgumentTypeError(
            f"unknown server {', '.join(unknown) or text!r}: use all or a comma-separated list of "
            + ", ".join(servers.SERVERS))
    return names


def parse_workloads(text: str) -> list[str]:
    if text == "all":
        return list(ALL_WORKLOADS)
    names = [name.strip() for name in text.split(",") if name.strip()]
    unknown = [name for name in names if name not in WORKLOADS]
    if unknown or not names:
        raise argparse.ArgumentTypeError(
            f"unknown workload {', '.join(unknown) or text!r}: use all or a comma-separated list of "
            + ", ".join(WORKLOADS))
    return names


def rates(text: str) -> list[int]:
    try:
        values = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        values = []
    if not values or min(values) <= 0:
        raise argparse.ArgumentTypeError(f"{text!r}: give deliveries per second, e.g. 90000 or 30000,90000")
    return values


def cpus(text: str) -> str | None:
    return None if text in ("", "none") else text


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m bench", description="AgentChat load bench with side-by-side peers.")
    commands = parser.add_subparsers(dest="command", required=True)
    run = commands.add_parser("run", help="run workloads and report", description=(
        "Workloads: fanout (saturated), paced (fan-out at --rate deliveries/s), idle, storm, "
        "persistence, peek, multiprocess; 'all' runs every one. Several: comma-separated."))
    run.add_argument("workload", type=parse_workloads, help="workload name(s) or all")
    run.add_argument("--server", type=parse_servers, default=list(servers.SERVERS),
                     help="agentchat, node-ws, socketio-node, socketio-py, a comma-separated list, or all (default)")
    run.add_argument("--url", help="use the server running at this ws:// URL instead of starting one "
                                   "(exactly one --server; no CPU or memory figures)")
    run.add_argument("--duration", type=float, default=10.0, help="measured seconds per run (default 10)")
    run.add_argument("--warmup", type=float, default=2.0, help="seconds of load before measuring (default 2)")
    run.add_argument("--agents", type=int, default=200, help="fan-out agents (default 200)")
    run.add_argument("--group", type=int, default=10, help="agents per channel (default 10)")
    run.add_argument("--payload", type=int, default=256, help="plaintext bytes per message (default 256)")
    run.add_argument("--window", type=int, default=16, help="unacknowledged messages per sender (default 16)")
    run.add_argument("--rate", type=rates, default=[90_000],
                     help="paced deliveries per second, or several comma-separated (default 90000)")
    run.add_argument("--processes", type=int, default=2, help="load generator processes (default 2)")
    run.add_argument("--server-cpus", type=cpus, default="0", help="taskset list for servers (default 0; none)")
    run.add_argument("--load-cpus", type=cpus, default="1", help="taskset list for the load (default 1; none)")
    run.add_argument("--sessions", type=int, default=5_000, help="idle sessions to hold (default 5000)")
    run.add_argument("--storm-sessions", type=int, default=5_000, help="sessions in the connect storm (default 5000)")
    run.add_argument("--storm-concurrency", type=int, default=200, help="handshakes in flight (default 200)")
    run.add_argument("--mp-processes", type=int, default=2, help="AgentChat processes for multiprocess (default 2)")
    run.add_argument("--pool", type=int, default=0, help="sealed messages per agent (default: enough for the run)")
    run.add_argument("--cache", type=Path, default=RESULTS / "cache",
                     help="where sealed messages are kept between runs (default bench/results/cache)")
    run.add_argument("--out", type=Path, default=None, help="results directory (default bench/results/<time>)")
    run.add_argument("--repeat", type=int, default=1,
                     help="runs per server, taking turns; the median is reported (default 1)")
    run.add_argument("--profile", action="store_true",
                     help="sample AgentChat with py-spy during each fan-out window (profile-*.txt, collapsed stacks)")
    run.add_argument("--publish", action="store_true", help="also copy the table and chart to bench/latest.*")
    return parser


def options_from(args: argparse.Namespace) -> Options:
    if args.url and len(args.server) != 1:
        raise SystemExit("bench: --url needs exactly one --server (the kind of server at that URL)")
    return Options(servers=args.server, duration=args.duration, warmup=args.warmup, agents=args.agents,
                   group=args.group, payload=args.payload, window=args.window, paced_rates=args.rate,
                   processes=args.processes, server_cpus=args.server_cpus, load_cpus=args.load_cpus,
                   idle_sessions=args.sessions, storm_sessions=args.storm_sessions,
                   storm_concurrency=args.storm_concurrency, mp_processes=args.mp_processes, pool=args.pool,
                   url=args.url, profile=args.profile, cache=args.cache,
                   repeat=max(1, args.repeat))


async def run_one(workload: str, server: str, fixture: Any, options: Options) -> dict[str, Any]:
    from bench import workloads as w

    try:
        if workload == "fanout":
            return await w.fanout_one(server, fixture, options)
        if workload.startswith("paced@"):
            return await w.fanout_one(server, fixture, options, paced_rate=int(workload[6:]))
        if workload == "idle":
            return await w.idle_one(server, options)
        if workload == "storm":
            return await w.storm_one(server, options)
        if workload == "persistence":
            return await w.persistence(fixture, options)
        if workload == "multiprocess":
            return await w.multiprocess(fixture, options)
        return w.peek_unavailable()
    except Exception as exc:  # one failing server must not lose the others' numbers
        print(f"bench: {workload} on {server} failed: {exc}", file=sys.stderr)
        return {"workload": workload, "server": server, "note": f"failed: {exc}"[:300]}


def median_row(rows: list[dict[str, Any]], workload: str) -> dict[str, Any]:
    """Of several runs of one server, the one with the median key number (``report.TABLES``); the
    key numbers of every run are kept in ``runs``."""
    if len(rows) == 1:
        return rows[0]
    key = report.TABLES[workload][2]
    measured = [r for r in rows if key(r) is not None]
    if not measured:
        return rows[-1]
    measured.sort(key=key)
    chosen = dict(measured[(len(measured) - 1) // 2])
    chosen["runs"] = [key(r) for r in rows]
    return chosen


async def run_workloads(workloads: list[str], options: Options) -> list[dict[str, Any]]:
    """Every workload on every server it applies to; with ``repeat`` > 1 the servers take turns
    (a, b, c, a, b, c, ...) so slow phases of a shared machine hit them alike, and the median is kept."""
    from bench import workloads as w

    rows: list[dict[str, Any]] = []
    fixture = None
    needs_fixture = {"fanout", "paced", "persistence", "multiprocess"}
    for workload in workloads:
        if workload not in PEER_WORKLOADS and "agentchat" not in options.servers:
            continue
        if workload in needs_fixture and fixture is None:
            fixture = w.prepare_fixture(options)
        names = options.servers if workload in PEER_WORKLOADS else ["agentchat"]
        variants = [f"paced@{rate}" for rate in options.paced_rates] if workload == "paced" else [workload]
        for variant in variants:
            runs: dict[str, list[dict[str, Any]]] = {name: [] for name in names}
            for _ in range(1 if workload == "peek" else options.repeat):
                for server in names:
                    runs[server].append(await run_one(variant, server, fixture, options))
            rows.extend(median_row(runs[server], workload) for server in names)
    return rows


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    options = options_from(args)
    servers.raise_fd_limit()
    servers.ensure_python_requirements(servers.BENCH_DIR / "requirements.txt", "picows")
    for name in options.servers:
        if options.url is None and name != "agentchat":
            servers.ensure_installed(name)
    started = time.strftime("%Y-%m-%d %H:%M:%S")
    out = args.out or RESULTS / time.strftime("%Y%m%d-%H%M%S")
    out.mkdir(parents=True, exist_ok=True)
    options.workdir = out / "work"
    options.workdir.mkdir(exist_ok=True)
    load_before = [round(x, 2) for x in os.getloadavg()]
    rows = asyncio.run(run_workloads(args.workload, options))
    run = {"started": started, "machine": report.machine(), "loadavg_before": load_before,
           "loadavg_after": [round(x, 2) for x in os.getloadavg()],
           "options": {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(options).items()},
           "workloads": args.workload, "rows": rows}
    text = report.render(run)
    print(text)
    report.write_json(run, out / "results.json")
    (out / "results.md").write_text(text)
    charted = report.chart(run, out / "chart.png")
    shutil.rmtree(options.workdir / "agentchat-store", ignore_errors=True)
    print(f"bench: results in {out}/ (results.json, results.md{', chart.png' if charted else ''})", file=sys.stderr)
    if args.publish:
        shutil.copy(out / "results.md", servers.BENCH_DIR / "latest.md")
        if charted:
            shutil.copy(out / "chart.png", servers.BENCH_DIR / "latest.png")
        print("bench: copied to bench/latest.md and bench/latest.png", file=sys.stderr)
    return 0
