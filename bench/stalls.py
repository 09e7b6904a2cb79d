"""``python -m bench.stalls [--threshold-ms 3] [--census] -- SERVE-OPTIONS``: serve AgentChat with a watch
on its event loop, and print where the loop stalled once it stops (Ctrl-C or SIGTERM).

A tail latency is made of moments when the loop could not run: a long turn of its own work, a garbage
collection, or the core taken by something else (a worker thread's file I/O, another process). A
sampling profile averages those away; this counts them. Drive the server with the bench, for example::

    taskset -c 0 python -m bench.stalls -- --port 18080 --store file:///tmp/stalls-store &
    python -m bench run paced --server agentchat --url ws://127.0.0.1:18080/api/v1/ws --rate 90000
    kill -INT %1

What it reports:

- loop lags: how late a 1 ms heartbeat woke, when over the threshold (count, total, percentiles);
  on Linux, for each lag, the loop thread's own CPU time and its run-queue wait over that interval
  (``/proc/self/task/<tid>/schedstat``): CPU time is work on the loop, run-queue wait is the core
  being used by another thread or process, and the rest is the thread sleeping (say, on the GIL);
- garbage collections over 1 ms, per generation, and every collection's count and total time;
- with ``--census``, what the young generation holds at a few collections: the objects that live
  long enough to be visited, by type (tuples by what they hold).
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import gc
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.stats import exact_percentile

HEARTBEAT_SECONDS = 0.001
SLOW_GC_SECONDS = 0.001
CENSUS_AT = (50, 100, 150)  # young collections at which --census looks


@dataclass
class Lag:
    at: float  # time.perf_counter() when the heartbeat went to sleep
    late_ms: float
    cpu_ms: float | None  # the loop thread's CPU time over the interval
    waiting_ms: float | None  # its time runnable but not running


@dataclass
class Watch:
    threshold_ms: float
    census: bool = False
    lags: list[Lag] = field(default_factory=list)
    slow_gcs: list[tuple[int, float]] = field(default_factory=list)  # (generation, ms)
    gc_count: list[int] = field(default_factory=lambda: [0, 0, 0])
    gc_seconds: list[float] = field(default_factory=lambda: [0.0, 0.0, 0.0])
    young: list[list[tuple[str, int]]] = field(default_factory=list)
    _gc_started: float = 0.0

    def on_gc(self, phase: str, info: dict[str, Any]) -> None:
        generation = info["generation"]
        if phase == "start":
            if self.census and generation == 0 and self.gc_count[0] in CENSUS_AT:
                self.young.append(young_census())
            self._gc_started = time.perf_counter()
            return
        took = time.perf_counter() - self._gc_started
        self.gc_count[generation] += 1
        self.gc_seconds[generation] += took
        if took > SLOW_GC_SECONDS:
            self.slow_gcs.append((generation, took * 1000))

    async def heartbeat(self) -> None:
        schedstat = Path(f"/proc/self/task/{threading.get_native_id()}/schedstat")
        readable = schedstat.exists()

        def sample() -> tuple[int, int]:
            run, wait, _ = schedstat.read_bytes().split()
            return int(run), int(wait)

        while True:
            started = time.perf_counter()
            before = sample() if readable else (0, 0)
            await asyncio.sleep(HEARTBEAT_SECONDS)
            late_ms = (time.perf_counter() - started - HEARTBEAT_SECONDS) * 1000
            if late_ms > self.threshold_ms:
                after = sample() if readable else None
                self.lags.append(Lag(started, late_ms,
                                     (after[0] - before[0]) / 1e6 if after else None,
                                     (after[1] - before[1]) / 1e6 if after else None))


def young_census() -> list[tuple[str, int]]:
    counts: collections.Counter[str] = collections.Counter()
    for obj in gc.get_objects(0):
        if type(obj) is tuple:
            counts["tuple(" + ", ".join(type(item).__name__ for item in obj[:4]) + ")"] += 1
        else:
            counts[type(obj).__qualname__] += 1
    return counts.most_common(12)


def report(watch: Watch, seconds: float) -> str:
    """The summary printed at the end (``seconds``: how long the server ran)."""
    lines = [f"AgentChat ran {seconds:.1f} s; loop lags over {watch.threshold_ms:g} ms:"]
    lags = [lag.late_ms for lag in watch.lags]
    if lags:
        lines.append(f"  {len(lags)} lags, {sum(lags):.0f} ms in all; p50 {exact_percentile(lags, 50):.1f} ms, "
                     f"p99 {exact_percentile(lags, 99):.1f} ms, max {max(lags):.1f} ms")
        measured = [lag for lag in watch.lags if lag.cpu_ms is not None]
        if measured:
            cpu = sum(lag.cpu_ms or 0.0 for lag in measured)
            waiting = sum(lag.waiting_ms or 0.0 for lag in measured)
            late = sum(lag.late_ms for lag in measured)
            lines.append(f"  over those lags the loop thread ran {cpu:.0f} ms, waited for its core "
                         f"{waiting:.0f} ms and slept {max(0.0, late - cpu - waiting):.0f} ms "
                         "(the last two: the core or the GIL taken by someone else)")
    else:
        lines.append("  none")
    names = ("young", "middle", "full")
    lines.append("garbage collections: " + ", ".join(
        f"{names[g]} {watch.gc_count[g]} ({watch.gc_seconds[g] * 1000:.0f} ms)" for g in range(3)))
    slow = collections.Counter(generation for generation, _ in watch.slow_gcs)
    if watch.slow_gcs:
        lines.append(f"  over {SLOW_GC_SECONDS * 1000:g} ms: " + ", ".join(
            f"{names[g]} {slow[g]}" for g in sorted(slow)) +
            f"; longest {max(ms for _, ms in watch.slow_gcs):.1f} ms")
    for index, census in enumerate(watch.young):
        lines.append(f"young generation at collection {CENSUS_AT[index]}: " +
                     ", ".join(f"{name} {count}" for name, count in census))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.stalls", description=__doc__.split("\n\n")[0])
    parser.add_argument("--threshold-ms", type=float, default=3.0, help="lags counted above this (default 3)")
    parser.add_argument("--census", action="store_true", help="list what the young generation holds")
    parser.add_argument("serve", nargs=argparse.REMAINDER, help="options of agentchat serve, after --")
    args = parser.parse_args(argv)
    serve = [option for option in args.serve if option != "--"]
    watch = Watch(args.threshold_ms, args.census)
    gc.callbacks.append(watch.on_gc)

    async def heartbeat(app: Any) -> Any:
        task = asyncio.get_running_loop().create_task(watch.heartbeat(), name="stalls-heartbeat")
        yield
        task.cancel()

    from agentchat.__main__ import main as agentchat_main

    started = time.perf_counter()
    try:
        code = agentchat_main(["serve", *serve], app_contexts=[heartbeat])
    finally:
        print(report(watch, time.perf_counter() - started), file=sys.stderr, flush=True)
    return code


if __name__ == "__main__":
    sys.exit(main())
