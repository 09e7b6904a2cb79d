"""``python -m bench run <workload> [--server ...]``: run workloads, print the table, save the files.

    python -m bench run fanout                      # AgentChat and every peer, saturated fan-out
    python -m bench run all --duration 10           # every workload
    python -m bench run paced --rate 90000 --server agentchat,node-ws
    python -m bench run fanout --server agentchat --url ws://127.0.0.1:8080   # a server you run

Results go to ``bench/results/<time>/`` (results.json, results.md, chart.png); ``--publish`` also
copies the table and chart to ``bench/latest.md`` and ``bench/latest.png`` for the README.
``python -m bench report A B --publish`` renders saved runs again, merged (a later row replaces an
earlier one of the same workload, server and rate).
"""

from __future__ import annotations

import argparse
import asyncio
import json
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
    parser = argparse.ArgumentParser(prog="python -m bench",
                                     description="AgentChat load bench with side-by-side peers.")
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
    run.add_argument("--redis-cpus", type=cpus, default=None,
                     help="taskset list for redis-server in the multi-process workloads (default: --server-cpus)")
    run.add_argument("--sessions", type=int, default=5_000, help="idle sessions to hold (default 5000)")
    run.add_argument("--storm-sessions", type=int, default=5_000, help="sessions in the connect storm (default 5000)")
    run.add_argument("--storm-concurrency", type=int, default=200, help="handshakes in flight (default 200)")
    run.add_argument("--mp-processes", type=int, default=2, help="AgentChat processes for multiprocess (default 2)")
    run.add_argument("--mp-rate", type=int, default=60_000,
                     help="deliveries/s at which multiprocess compares the Redis bus's CPU per delivery with "
                          "the in-process bus's (default 60000)")
    run.add_argument("--peeks", type=int, default=20, help="peeks opened in the peek workload (default 20)")
    run.add_argument("--peek-window", type=float, default=60.0,
                     help="refusal window of those peeks in seconds (default 60, the product's)")
    run.add_argument("--peek-rate", type=int, default=0,
                     help="deliveries/s during the peek workload (default: half the saturated fan-out of this run)")
    run.add_argument("--pool", type=int, default=0, help="sealed messages per agent (default: enough for the run)")
    run.add_argument("--cache", type=Path, default=RESULTS / "cache",
                     help="where sealed messages are kept between runs (default bench/results/cache)")
    run.add_argument("--out", type=Path, default=None, help="results directory (default bench/results/<time>)")
    run.add_argument("--repeat", type=int, default=1,
                     help="runs per server, taking turns; the median is reported (default 1)")
    run.add_argument("--profile", action="store_true",
                     help="sample AgentChat with py-spy during each fan-out window (profile-*.txt, collapsed stacks)")
    run.add_argument("--publish", action="store_true", help="also copy the table and chart to bench/latest.*")
    again = commands.add_parser("report", help="render saved results again, merging several runs", description=(
        "Re-render results.json files (table, JSON, chart) into one report; a later file's row replaces "
        "an earlier one of the same workload, server and rate."))
    again.add_argument("results", type=Path, nargs="+", help="results.json files or the directories holding them")
    again.add_argument("--out", type=Path, default=None, help="where to write (default bench/results/<time>-merged)")
    again.add_argument("--publish", action="store_true", help="also copy the table and chart to bench/latest.*")
    return parser


def options_from(args: argparse.Namespace) -> Options:
    if args.url and len(args.server) != 1:
        raise SystemExit("bench: --url needs exactly one --server (the kind of server at that URL)")
    return Options(servers=args.server, duration=args.duration, warmup=args.warmup, agents=args.agents,
                   group=args.group, payload=args.payload, window=args.window, paced_rates=args.rate,
                   processes=args.processes, server_cpus=args.server_cpus, load_cpus=args.load_cpus,
                   redis_cpus=args.redis_cpus,
                   idle_sessions=args.sessions, storm_sessions=args.storm_sessions,
                   storm_concurrency=args.storm_concurrency, mp_processes=args.mp_processes, mp_rate=args.mp_rate, pool=args.pool,
                   url=args.url, profile=args.profile,
                   repeat=max(1, args.repeat), cache=args.cache.resolve(), peeks=args.peeks,
                   peek_window=args.peek_window, peek_rate=args.peek_rate)


async def run_one(workload: str, server: str, fixture: Any, options: Options,
                  saturated: float | None = None) -> dict[str, Any]:
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
        if workload == "peek":
            return await w.peek_under_load(fixture, options, saturated)
        if workload == "sessions-mp":
            return await w.sessions_across_processes(options)
        raise ValueError(f"unknown workload {workload}")
    except Exception as exc:  # one failing server must not lose the others' numbers
        print(f"bench: {workload} on {server} failed: {exc}", file=sys.stderr)
        name = f"agentchat x{options.mp_processes} (redis)" if workload == "multiprocess" else server
        return {"workload": workload.split("@")[0], "server": name, "note": f"failed: {exc}"[:300]}


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
    needs_fixture = {"fanout", "paced", "persistence", "multiprocess", "peek"}
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
                saturated = next((r.get("delivered_per_s") for r in rows
                                  if r.get("workload") == "fanout" and r.get("server") == "agentchat"), None)
                for server in names:
                    runs[server].append(await run_one(variant, server, fixture, options, saturated))
            rows.extend(median_row(runs[server], workload) for server in names)
    return rows


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "report":
        return report_main(args)
    options = options_from(args)
    servers.raise_fd_limit()
    servers.ensure_python_requirements(servers.BENCH_DIR / "requirements.txt", "picows")
    for name in options.servers:
        if options.url is None and name != "agentchat":
            servers.ensure_installed(name)
    started = time.strftime("%Y-%m-%d %H:%M:%S")
    # absolute: servers run in other working directories (redis-server even changes its own)
    out = (args.out or RESULTS / time.strftime("%Y%m%d-%H%M%S")).resolve()
    out.mkdir(parents=True, exist_ok=True)
    options.workdir = out / "work"
    options.workdir.mkdir(exist_ok=True)
    load_before = [round(x, 2) for x in os.getloadavg()]
    rows = asyncio.run(run_workloads(args.workload, options))
    run = {"started": started, "machine": report.machine(), "loadavg_before": load_before,
           "loadavg_after": [round(x, 2) for x in os.getloadavg()],
           "options": {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(options).items()},
           "workloads": args.workload, "rows": rows}
    write_report(run, out, args.publish)
    for store in options.workdir.glob("**/*store"):  # message segments: large, and of no further use
        shutil.rmtree(store, ignore_errors=True)
    return 0


def row_key(row: dict[str, Any]) -> tuple[Any, ...]:
    rate = row.get("target_per_s") if row.get("workload") in ("paced", "persistence") else None
    return (row.get("workload"), row.get("server"), rate)


def merge_runs(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """One run from several: the first's header, every row, a later row replacing an earlier one with
    the same workload, server and rate, and a failed row dropped where its workload was measured; the
    merged runs' start times are listed."""
    merged = dict(runs[0])
    rows: dict[tuple[Any, ...], dict[str, Any]] = {}
    for run in runs:
        for row in run["rows"]:
            rows.pop(row_key(row), None)
            rows[row_key(row)] = row
    measured = {r.get("workload") for r in rows.values() if not str(r.get("note", "")).startswith("failed")}
    kept = [r for r in rows.values()
            if not (str(r.get("note", "")).startswith("failed") and r.get("workload") in measured)]
    order = {name: i for i, name in enumerate(report.TABLES)}
    merged["rows"] = sorted(kept, key=lambda r: order.get(r.get("workload"), len(order)))
    if len(runs) > 1:
        merged["started"] = runs[-1]["started"]
        merged["loadavg_after"] = runs[-1]["loadavg_after"]
        merged["sources"] = []
        for run in runs:
            mine = [r for r in merged["rows"] if any(r is row for row in run["rows"])]
            names = sorted({r["workload"] + (f" at {r['target_per_s']:,}/s" if r["workload"] == "paced" else "")
                            for r in mine}, key=str)
            if names:
                merged["sources"].append({"started": run["started"], "loadavg_before": run["loadavg_before"],
                                          "loadavg_after": run["loadavg_after"], "workloads": names})
    return merged


def write_report(run: dict[str, Any], out: Path, publish: bool) -> None:
    """Print the table; write results.json, results.md and chart.png to ``out``; with ``publish``
    copy the table and chart to bench/latest.md and bench/latest.png."""
    text = report.render(run)
    print(text)
    report.write_json(run, out / "results.json")
    (out / "results.md").write_text(text)
    charted = report.chart(run, out / "chart.png")
    print(f"bench: results in {out}/ (results.json, results.md{', chart.png' if charted else ''})", file=sys.stderr)
    if publish:
        shutil.copy(out / "results.md", servers.BENCH_DIR / "latest.md")
        if charted:
            shutil.copy(out / "chart.png", servers.BENCH_DIR / "latest.png")
        print("bench: copied to bench/latest.md and bench/latest.png", file=sys.stderr)


def report_main(args: argparse.Namespace) -> int:
    runs = []
    for path in args.results:
        path = path / "results.json" if path.is_dir() else path
        runs.append(json.loads(path.read_text()))
    out = args.out or RESULTS / (time.strftime("%Y%m%d-%H%M%S") + "-merged")
    out.mkdir(parents=True, exist_ok=True)
    write_report(merge_runs(runs), out, args.publish)
    return 0
