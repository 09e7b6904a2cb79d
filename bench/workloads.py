"""The workloads: each starts its server(s), drives generator processes, and returns result rows.

A row is a plain dict: ``{"workload": ..., "server": ..., <numbers>}``; ``bench.report`` turns the
rows of one run into the table, the JSON file and the chart.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import math
import secrets
import os
import shutil
import signal
import sys
import tempfile
import time
import urllib.request
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp

from bench import fixture as fixtures
from bench import servers
from bench.progress import Progress
from bench.stats import Histogram, cpu_share, latency_summary_ms, rate

WORKLOADS = ("fanout", "paced", "idle", "storm", "persistence", "peek", "multiprocess", "sessions-mp")
# What "all" runs, in order; ``fanout`` and ``paced`` are the two modes of the fan-out workload.
ALL_WORKLOADS = WORKLOADS
PEER_WORKLOADS = {"fanout", "paced", "idle", "storm"}
# A row notes when more than this share of the server's core ran other processes (a shared machine).
FOREIGN_CPU_NOTE = 0.1


@dataclass
class Options:
    servers: list[str]
    duration: float = 10.0
    warmup: float = 2.0
    agents: int = 200
    group: int = 10
    payload: int = 256
    window: int = 16
    paced_rates: list[int] = field(default_factory=lambda: [90_000])  # deliveries per second
    processes: int = 2  # load generator processes
    server_cpus: str | None = "0"
    load_cpus: str | None = "1"
    redis_cpus: str | None = None  # redis-server in the multi-process workloads; None: as server_cpus
    idle_sessions: int = 5_000
    idle_agents: int = 200
    storm_sessions: int = 5_000
    storm_concurrency: int = 200
    mp_processes: int = 2
    mp_rate: int = 60_000  # deliveries/s at which the multi-process workload compares CPU per delivery
    pool: int = 0  # sealed frames per agent; 0: enough for the duration
    url: str | None = None  # a running server to use instead of starting one
    profile: bool = False  # py-spy the AgentChat server during the measured window
    repeat: int = 1  # runs per server (taking turns); the median is reported
    peeks: int = 20  # peeks opened during the peek workload (one per channel, round robin)
    peek_window: float = 60.0  # the refusal window (AGENTCHAT_PEEK_REFUSAL_WINDOW_SECONDS)
    peek_rate: int = 0  # deliveries/s during the peek workload; 0: half the saturated rate
    workdir: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="agentchat-bench-")))
    cache: Path = servers.BENCH_DIR / "results" / "cache"

    def pool_size(self) -> int:
        # 220 messages/s per agent is 440k deliveries/s with the default 200 agents in groups of 10.
        return self.pool or max(500, int((self.warmup + self.duration) * 220))


# ---------------------------------------------------------------------------------- generators


class Generators:
    """Load generator processes (``python -m bench.loadgen``) pinned to the load cores."""

    def __init__(self, jobs: list[dict[str, Any]], options: Options, label: str) -> None:
        self.jobs = jobs
        self.options = options
        self.label = label
        self.procs: list[asyncio.subprocess.Process] = []
        self.ready: list[dict[str, Any]] = []
        self.results: list[dict[str, Any]] = []
        self.progress: dict[int, int] = {}

    async def start(self) -> list[dict[str, Any]]:
        workdir = self.options.workdir
        for n, job in enumerate(self.jobs):
            path = workdir / f"job-{self.label}-{n}.json"
            path.write_text(json.dumps(job))
            log = open(workdir / f"loadgen-{self.label}-{n}.log", "wb")
            command = servers.pinned([sys.executable, "-m", "bench.loadgen", str(path)], self.options.load_cpus)
            proc = await asyncio.create_subprocess_exec(
                *command, stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, stderr=log,
                cwd=servers.REPO, env={**os.environ, "PYTHONPATH": str(servers.REPO)}, limit=1 << 24)
            self.procs.append(proc)
        self.ready = [await self._expect(proc, "ready", 300) for proc in self.procs]
        return self.ready

    async def _expect(self, proc: asyncio.subprocess.Process, event: str, timeout: float) -> dict[str, Any]:
        assert proc.stdout is not None
        deadline = time.monotonic() + timeout
        while True:
            line = await asyncio.wait_for(proc.stdout.readline(), max(0.1, deadline - time.monotonic()))
            if not line:
                raise RuntimeError(f"a load generator exited (see {self.options.workdir}/loadgen-*.log)")
            message = json.loads(line)
            if message["event"] == "progress":
                self.progress[id(proc)] = message["delivered"]
                continue
            if message["event"] == event:
                return message

    def send(self, command: str) -> None:
        for proc in self.procs:
            assert proc.stdin is not None
            proc.stdin.write((command + "\n").encode())

    def delivered_so_far(self) -> int:
        return sum(self.progress.values())

    async def collect(self, timeout: float) -> list[dict[str, Any]]:
        self.results = list(await asyncio.gather(*(self._expect(p, "result", timeout) for p in self.procs)))
        return self.results

    async def stop(self) -> None:
        for proc in self.procs:
            if proc.returncode is None and proc.stdin is not None:
                try:
                    proc.stdin.write(b"stop\n")
                    proc.stdin.close()
                except (BrokenPipeError, ConnectionResetError):
                    pass
        for proc in self.procs:
            try:
                await asyncio.wait_for(proc.wait(), 10)
            except asyncio.TimeoutError:
                proc.kill()
                await proc.wait()


def split(items: list[Any], parts: int) -> list[list[Any]]:
    """``items`` dealt into ``parts`` lists of near-equal length, order kept within each."""
    parts = max(1, min(parts, len(items))) if items else 1
    size = math.ceil(len(items) / parts) if items else 0
    return [items[i * size:(i + 1) * size] for i in range(parts)] if items else [[]]


def source_addresses(sessions: int, per_address: int = 20_000) -> list[str]:
    """Loopback source addresses enough for ``sessions`` client sockets (each address has about 28k
    ephemeral ports towards one server port); none (the kernel's choice) when one address is enough."""
    if sessions <= per_address:
        return []
    return [f"127.0.0.{2 + i}" for i in range(math.ceil(sessions / per_address))]


# ---------------------------------------------------------------------------------- servers


class Target:
    """The server of one measurement: started here (and stopped after), or one the user runs."""

    def __init__(self, name: str, options: Options, env: dict[str, str] | None = None) -> None:
        self.name = name
        self.options = options
        self.process: servers.ServerProcess | None = None
        if options.url is None:
            if name == "agentchat":
                self.process = servers.agentchat_server(options.workdir / f"{name}-{time.monotonic_ns()}",
                                                        options.server_cpus, env=env)
            else:
                self.process = servers.peer_server(name, options.workdir, options.server_cpus)

    def __enter__(self) -> Target:
        if self.process is not None:
            self.process.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.process is not None:
            self.process.stop()

    @property
    def ws_url(self) -> str:
        if self.process is not None:
            return self.process.ws_url
        assert self.options.url is not None
        url = self.options.url.rstrip("/")
        if self.name == "agentchat" and not url.endswith("/api/v1/ws"):
            url += "/api/v1/ws"
        elif self.name.startswith("socketio") and "socket.io" not in url:
            url += "/socket.io/?EIO=4&transport=websocket"
        return url

    @property
    def http_base(self) -> str:
        if self.process is not None:
            return self.process.http_base
        url = self.ws_url.replace("ws://", "http://", 1).replace("wss://", "https://", 1)
        return url.split("/api/v1/ws")[0]

    def cpu_seconds(self) -> float | None:
        return self.process.cpu_seconds() if self.process is not None else None

    def rss_bytes(self) -> int | None:
        return self.process.rss_bytes() if self.process is not None else None


ProgressFn = Callable[[float, str], None]


# ---------------------------------------------------------------------------------- fan-out


def fanout_jobs(fixture: fixtures.Fixture, tokens: list[str], urls: list[str], options: Options,
                protocol: str, rate_msgs: float | None) -> list[dict[str, Any]]:
    """Whole channels per generator process (so a delivery's latency is read on one clock).
    Agent i connects to ``urls[i % len(urls)]`` (several URLs: several server processes)."""
    channels = list(fixture.channels.items())
    jobs = []
    for share in split(channels, options.processes):
        clients = []
        for channel, info in share:
            for i in info["members"]:
                agent = fixture.agents[i]
                clients.append({"token": tokens[i] if tokens else "", "room": channel,
                                "frames": str(fixture.frames_path(i)), "tag": agent.tag,
                                "url": urls[i % len(urls)]})
        job_rate = rate_msgs * len(clients) / len(fixture.agents) if rate_msgs else None
        jobs.append({"protocol": protocol, "url": urls[0], "mode": "fanout", "clients": clients,
                     "window": options.window, "rate": job_rate, "warmup": options.warmup,
                     "duration": options.duration, "connect_concurrency": 50})
    return jobs


async def start_profiler(pid: int, seconds: float | None, out: Path) -> asyncio.subprocess.Process | None:
    """``py-spy record`` of ``pid`` for ``seconds`` (None: until ``stop_profiler``), as collapsed
    stacks in ``out``; None without py-spy."""
    spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    if not Path(spy).exists():
        print("bench: --profile needs py-spy (pip install -e '.[bench]')", file=sys.stderr)
        return None
    duration = ["--duration", str(max(1, int(seconds)))] if seconds else []
    return await asyncio.create_subprocess_exec(
        spy, "record", "--pid", str(pid), *duration, "--rate", "250", "--format", "raw", "--output", str(out),
        "--nonblocking", "--threads", stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL)


async def stop_profiler(profiler: asyncio.subprocess.Process | None) -> None:
    """End an open-ended ``py-spy record`` (SIGINT makes it write its output)."""
    if profiler is None:
        return
    if profiler.returncode is None:
        profiler.send_signal(signal.SIGINT)
    try:
        await asyncio.wait_for(profiler.wait(), 30)
    except asyncio.TimeoutError:
        profiler.kill()
        await profiler.wait()


async def drive_fanout(jobs: list[dict[str, Any]], options: Options, label: str, progress: Progress,
                       cpu_of: Callable[[], float | None], profile_pid: int | None = None) -> dict[str, Any]:
    """Run fan-out jobs; returns delivered/s, sent/s, latency, and server CPU share over the window.
    With ``profile_pid`` (and ``--profile``), that process is sampled by py-spy during the window."""
    generators = Generators(jobs, options, label)
    profiler = None
    try:
        ready = await generators.start()
        failures = sum(r["failures"] for r in ready)
        if failures:
            first = next(r["first_failure"] for r in ready if r["failures"])
            raise RuntimeError(f"{failures} clients could not connect: {first}")
        start_at = time.time() + 0.5
        generators.send(f"go {start_at}")
        total = options.warmup + options.duration
        await asyncio.sleep(max(0.0, start_at + options.warmup - time.time()))
        cpu_before = cpu_of()
        # a server the bench did not start is not pinned by it: its cores are unknown
        server_cores = [] if options.url else servers.parse_cpu_list(options.server_cpus)
        ticks_before = servers.cpu_ticks(server_cores)
        window_start = time.monotonic()
        if options.profile and profile_pid is not None:
            profiler = await start_profiler(profile_pid, options.duration,
                                            options.workdir.parent / f"profile-{label}.txt")
        last, last_t = generators.delivered_so_far(), time.monotonic()
        collecting = asyncio.ensure_future(generators.collect(total + 120))
        cpu_after = None
        while not collecting.done():
            await asyncio.wait({collecting}, timeout=0.25)
            now = time.monotonic()
            if cpu_after is None and now - window_start >= options.duration:
                cpu_after = cpu_of()
                ticks_after = servers.cpu_ticks(server_cores)
            delivered = generators.delivered_so_far()
            if now - last_t >= 1.0:
                current = (delivered - last) / (now - last_t)
                last, last_t = delivered, now
                progress.update((options.warmup + now - window_start) / total, f"{current:,.0f} deliveries/s")
        if cpu_after is None:
            cpu_after = cpu_of()
            ticks_after = servers.cpu_ticks(server_cores)
        results = collecting.result()
    finally:
        await generators.stop()
        if profiler is not None:
            await profiler.wait()
    hist = Histogram()
    for r in results:
        hist.merge(Histogram.from_json(r["latency"]))
    seconds = max(r["seconds"] for r in results)
    delivered = sum(r["delivered"] for r in results)
    sent = sum(r["sent"] for r in results)
    row: dict[str, Any] = {
        "delivered_per_s": round(rate(delivered, seconds)),
        "sent_per_s": round(rate(sent, seconds)),
        "latency_ms": latency_summary_ms(hist),
        "load_cpu": round(sum(r["cpu_seconds"] for r in results) / seconds, 2),
        "errors": sum(r["errors"] for r in results),
        "seconds": round(seconds, 2),
    }
    if cpu_before is not None and cpu_after is not None:
        row["server_cpu"] = round(cpu_share(cpu_after - cpu_before, options.duration), 2)
    if server_cores:
        row.update(servers.core_usage(ticks_before, ticks_after, row.get("server_cpu")))
        if row.get("foreign_cpu", 0) > FOREIGN_CPU_NOTE:
            row["note"] = (f"{row['foreign_cpu']:.0%} of the server core went to other processes; "
                           "numbers are low")
    first_error = next((r["first_error"] for r in results if r["first_error"]), "")
    if first_error:
        row["first_error"] = first_error
    exhausted = sum(r["exhausted"] for r in results)
    if exhausted:
        row["note"] = f"{exhausted} senders ran out of sealed messages: raise --pool"
    return row


def prepare_fixture(options: Options) -> fixtures.Fixture:
    progress = Progress("sealing messages")
    made = fixtures.load_or_make(options.cache, agents=options.agents, group=options.group,
                                 payload=options.payload, per_agent=options.pool_size(),
                                 report=lambda done, total: progress.update(done / total, f"{done}/{total} agents"))
    progress.done(f"{len(made.agents)} agents x {made.per_agent} sealed {options.payload}-byte messages")
    return made


def fixture_for(fixture: fixtures.Fixture, options: Options, rate: float, duration: float) -> fixtures.Fixture:
    """``fixture``, or a larger one, with sealed messages enough for ``rate`` deliveries/s over
    ``duration`` seconds after the warm-up. The default pool is sized for ``--duration``: the longer
    workloads (persistence, peek) would otherwise run out part way and measure an idle server."""
    per_agent_rate = rate / options.group / max(1, len(fixture.agents))
    needed = int(per_agent_rate * (options.warmup + duration) * 1.2) + 1
    if needed <= fixture.per_agent:
        return fixture
    return prepare_fixture(dataclasses.replace(options, pool=max(options.pool, needed)))


async def fanout_one(server: str, fixture: fixtures.Fixture, options: Options,
                     paced_rate: int | None = None) -> dict[str, Any]:
    """Saturated fan-out, or paced at ``paced_rate`` deliveries per second."""
    paced = paced_rate is not None
    workload = "paced" if paced else "fanout"
    label = f"{workload}-{server}" + (f"-{paced_rate}" if paced else "")
    progress = Progress(f"{workload} {server}" + (f" @{paced_rate:,}/s" if paced else ""))
    rate_msgs = paced_rate / options.group if paced_rate else None
    with Target(server, options) as target:
        tokens: list[str] = []
        if server == "agentchat":
            progress.update(0.0, "registering agents, creating channels")
            tokens, _ = await fixtures.setup_agentchat(target.http_base, fixture)
        jobs = fanout_jobs(fixture, tokens, [target.ws_url], options, servers.PROTOCOL[server], rate_msgs)
        row = await drive_fanout(jobs, options, label, progress, target.cpu_seconds,
                                 target.process.pid if target.process is not None and server == "agentchat" else None)
    progress.done(f"{row['delivered_per_s']:,} deliveries/s, p99 {row['latency_ms']['p99']} ms")
    row.update({"workload": workload, "server": server})
    if paced:
        row["target_per_s"] = paced_rate
    return row


# ---------------------------------------------------------------------------------- idle, storm


def session_jobs(server: str, url: str, tokens: list[str], sessions: int, options: Options, mode: str,
                 concurrency: int) -> list[dict[str, Any]]:
    hard = servers.fd_hard_limit()
    per_process = max(1, hard - 200)
    processes = max(options.processes, math.ceil(sessions / per_process))
    specs = [{"token": tokens[i % len(tokens)] if tokens else "", "room": f"idle-{i % 1000}"}
             for i in range(sessions)]
    sources = source_addresses(sessions)
    return [{"protocol": servers.PROTOCOL[server], "url": url, "mode": mode, "clients": share,
             "source_ips": sources, "connect_concurrency": max(1, concurrency // processes)}
            for share in split(specs, processes)]


def session_cap(requested: int) -> tuple[int, str]:
    """Sessions one server process can hold here: its open-files hard limit bounds it."""
    cap = servers.fd_hard_limit() - 200
    if requested > cap:
        return cap, f"capped at {cap:,} sessions by the open-files hard limit ({servers.fd_hard_limit():,})"
    return requested, ""


async def idle_one(server: str, options: Options) -> dict[str, Any]:
    sessions, note = session_cap(options.idle_sessions)
    progress = Progress(f"idle {server}")
    with Target(server, options) as target:
        tokens: list[str] = []
        if server == "agentchat":
            progress.update(0.0, "registering agents")
            _, tokens = await fixtures.setup_agentchat(target.http_base, None,
                                                       extra_agents=min(sessions, options.idle_agents))
        await asyncio.sleep(1.0)
        rss_before = target.rss_bytes()
        jobs = session_jobs(server, target.ws_url, tokens, sessions, options, "idle", 200)
        generators = Generators(jobs, options, f"idle-{server}")
        try:
            progress.update(0.1, f"opening {sessions:,} sessions")
            ready = await generators.start()
            opened = sum(r["clients"] for r in ready)
            await asyncio.sleep(2.0)
            rss_after = target.rss_bytes()
            generators.send("go 0")
            generators.send("stop")
            results = await generators.collect(60)
        finally:
            await generators.stop()
    row: dict[str, Any] = {"workload": "idle", "server": server, "sessions": opened,
                           "failures": sum(r["failures"] for r in ready),
                           "disconnected": sum(r["disconnected"] for r in results)}
    if rss_before is not None and rss_after is not None and opened:
        row["rss_mb"] = round(rss_after / 2**20, 1)
        row["kb_per_session"] = round((rss_after - rss_before) / opened / 1024, 2)
    first = next((r["first_failure"] for r in ready if r["failures"]), "")
    if first:
        row["first_error"] = first
    if note:
        row["note"] = note
    progress.done(f"{opened:,} sessions, {row.get('kb_per_session', '?')} KB each")
    return row


async def storm_one(server: str, options: Options) -> dict[str, Any]:
    sessions, note = session_cap(options.storm_sessions)
    progress = Progress(f"storm {server}")
    with Target(server, options) as target:
        tokens: list[str] = []
        if server == "agentchat":
            progress.update(0.0, "registering agents")
            _, tokens = await fixtures.setup_agentchat(target.http_base, None,
                                                       extra_agents=min(sessions, options.idle_agents))
        jobs = session_jobs(server, target.ws_url, tokens, sessions, options, "storm", options.storm_concurrency)
        generators = Generators(jobs, options, f"storm-{server}")
        try:
            await generators.start()  # processes up, nothing connected yet
            profiler = None
            if options.profile and server == "agentchat" and target.process is not None:
                profiler = await start_profiler(target.process.pid, None,
                                                options.workdir.parent / f"profile-storm-{server}.txt")
                await asyncio.sleep(0.5)  # py-spy attaches
            cpu_before = target.cpu_seconds()
            started = time.monotonic()
            generators.send(f"go {time.time()}")
            progress.update(0.2, f"connecting {sessions:,} sessions")
            results = await generators.collect(300)
            elapsed = time.monotonic() - started
            cpu_after = target.cpu_seconds()
            await stop_profiler(profiler)
            generators.send("stop")
        finally:
            await generators.stop()
    opened = sum(r["clients"] for r in results)
    seconds = max(r["connect_seconds"] for r in results)
    hist = Histogram()
    for r in results:
        hist.merge(Histogram.from_json(r["connect_latency"]))
    row: dict[str, Any] = {"workload": "storm", "server": server, "sessions": opened,
                           "sessions_per_s": round(rate(opened, seconds)), "latency_ms": latency_summary_ms(hist),
                           "failures": sum(r["failures"] for r in results), "seconds": round(seconds, 2),
                           "load_cpu": round(sum(r["cpu_seconds"] for r in results) / seconds, 2) if seconds else None}
    if cpu_before is not None and cpu_after is not None:
        row["server_cpu"] = round(cpu_share(cpu_after - cpu_before, elapsed), 2)
    first = next((r["first_failure"] for r in results if r["failures"]), "")
    if first:
        row["first_error"] = first
    if note:
        row["note"] = note
    progress.done(f"{row['sessions_per_s']:,} sessions/s")
    return row


# ---------------------------------------------------------------------------------- persistence


def parse_prometheus(text: str) -> dict[str, float]:
    """Prometheus text exposition -> ``{"name{labels}": value}`` (comments skipped)."""
    values: dict[str, float] = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        name, _, value = line.rpartition(" ")
        try:
            values[name] = float(value)
        except ValueError:
            continue
    return values


def scrape(base: str) -> dict[str, float]:
    with urllib.request.urlopen(base + "/metrics", timeout=5) as response:
        return parse_prometheus(response.read().decode())


def persistence_cost(before: dict[str, float], after: dict[str, float]) -> dict[str, Any]:
    """Store operations per 1,000 messages between two scrapes of ``/metrics``."""
    def delta(name: str) -> float:
        return after.get(name, 0.0) - before.get(name, 0.0)

    messages = int(delta("agentchat_messages_in_total"))
    prefix = 'agentchat_store_operations_total{op="'
    ops = {key[len(prefix):-2]: int(delta(key)) for key in after if key.startswith(prefix)}
    total = sum(ops.values())
    batches = int(delta("agentchat_batch_messages_count"))
    return {"messages": messages, "store_ops": total,
            "ops_per_1000_messages": round(total / messages * 1000, 2) if messages else None,
            "ops": {k: v for k, v in ops.items() if v}, "batches": batches,
            "messages_per_batch": round(delta("agentchat_batch_messages_sum") / batches, 1) if batches else None,
            "flush_ms": round(delta("agentchat_batch_flush_seconds_sum") / batches * 1000, 1) if batches else None}


# A channel's messages become a segment after 60 s at the latest (store/messages.py): a shorter window
# would count the write-ahead batches and leave out the segments and deletes they turn into.
PERSISTENCE_MIN_SECONDS = 65.0


async def persistence(fixture: fixtures.Fixture, options: Options) -> dict[str, Any]:
    """Store operations per 1,000 messages while fan-out runs paced (the lowest ``--rate``), read from the
    server's own ``/metrics`` (``agentchat_store_operations_total``, ``agentchat_messages_in_total``),
    over at least ``PERSISTENCE_MIN_SECONDS`` so compaction into segments is counted too."""
    options = dataclasses.replace(options, duration=max(options.duration, PERSISTENCE_MIN_SECONDS))
    fixture = fixture_for(fixture, options, min(options.paced_rates), options.duration)
    progress = Progress("persistence agentchat")
    samples: list[dict[str, float]] = []
    with Target("agentchat", options) as target:
        tokens, _ = await fixtures.setup_agentchat(target.http_base, fixture)
        jobs = fanout_jobs(fixture, tokens, [target.ws_url], options, "agentchat",
                           min(options.paced_rates) / options.group)

        def sample() -> float | None:
            samples.append(scrape(target.http_base))
            return target.cpu_seconds()

        row = await drive_fanout(jobs, options, "persistence", progress, sample)
    result = {"workload": "persistence", "server": "agentchat", **persistence_cost(samples[0], samples[-1]),
              "target_per_s": min(options.paced_rates), "delivered_per_s": row["delivered_per_s"]}
    if row.get("note"):
        result["note"] = row["note"]
    progress.done(f"{result['ops_per_1000_messages']} store operations per 1,000 messages")
    return result


# ---------------------------------------------------------------------------------- multi-process


async def multiprocess(fixture: fixtures.Fixture, options: Options) -> dict[str, Any]:
    """``--mp-processes`` AgentChat processes sharing a Redis bus and one store directory (agent i
    connects to process i mod N, so every channel spans the processes) against one in-process
    AgentChat, on the same fan-out, in the same run: first both at the same paced load (``--mp-rate``
    deliveries/s), then both saturated.

    The efficiency is deliveries per CPU-second (servers and redis-server together) on the Redis bus
    over the same on the in-process bus, at the paced load: CPU per delivery falls as load rises
    (more frames per socket write, more messages per store batch, per bus call), so two setups
    compared at their own saturation differ in load as much as in cost. The saturated ratio is
    reported beside it: how much more one core carries in-process."""
    n = options.mp_processes
    label = f"agentchat x{n} (redis)"
    progress = Progress(f"multiprocess {label}")
    if not (servers.REPO / "agentchat" / "bus" / "redis.py").exists():
        return {"workload": "multiprocess", "server": label, "note": "not available: no Redis bus"}
    paced_msgs = options.mp_rate / options.group
    paced = await _redis_bus_run(fixture, options, n, paced_msgs, progress, "multiprocess-paced")
    paced_ref = await _inprocess_run(fixture, options, paced_msgs, progress, "multiprocess-reference-paced")
    row = await _redis_bus_run(fixture, options, n, None, progress, "multiprocess")
    saturated_ref = await _inprocess_run(fixture, options, None, progress, "multiprocess-reference")
    row.update({"workload": "multiprocess", "server": label, "processes": n, "paced_rate": options.mp_rate,
                "inprocess_delivered_per_s": saturated_ref["delivered_per_s"],
                "inprocess_cpu_ms_per_1000": saturated_ref.get("cpu_ms_per_1000"),
                "paced_delivered_per_s": paced["delivered_per_s"], "paced_p99_ms": paced["latency_ms"]["p99"],
                "paced_server_cpu_ms_per_1000": paced.get("server_cpu_ms_per_1000"),
                "paced_redis_cpu_ms_per_1000": paced.get("redis_cpu_ms_per_1000"),
                "paced_inprocess_cpu_ms_per_1000": paced_ref.get("cpu_ms_per_1000"),
                "paced_inprocess_p99_ms": paced_ref["latency_ms"]["p99"]})
    # deliveries per CPU-second on the Redis bus / the same on the in-process bus
    row["saturated_efficiency"] = _efficiency(saturated_ref.get("cpu_ms_per_1000"), row)
    row["redis_bus_efficiency"] = _efficiency(paced_ref.get("cpu_ms_per_1000"), paced)
    short = [name for name, r in (("the Redis bus", paced), ("in-process", paced_ref))
             if r["delivered_per_s"] < 0.97 * options.mp_rate]
    if short:
        row["note"] = (f"{' and '.join(short)} did not reach the paced {options.mp_rate:,}/s: "
                       "the efficiency compares unequal loads (lower --mp-rate)")
    progress.done(f"efficiency {row['redis_bus_efficiency']} at {options.mp_rate:,}/s, "
                  f"saturated {row['delivered_per_s']:,} vs {row['inprocess_delivered_per_s']:,} deliveries/s "
                  f"(ratio {row['saturated_efficiency']})")
    return row


def _efficiency(inprocess_cpu: float | None, redis_row: dict[str, Any]) -> float | None:
    cost = (redis_row.get("server_cpu_ms_per_1000") or 0) + (redis_row.get("redis_cpu_ms_per_1000") or 0)
    return round(inprocess_cpu / cost, 3) if inprocess_cpu and cost else None


async def _redis_bus_run(fixture: fixtures.Fixture, options: Options, n: int, rate_msgs: float | None,
                         progress: Progress, label: str) -> dict[str, Any]:
    """One fan-out over ``n`` processes on a fresh Redis: the row, with the CPU per 1,000 deliveries
    of the servers and of redis-server."""
    workdir = options.workdir / f"multi-{time.monotonic_ns()}"
    redis = servers.RedisServer(servers.free_port(), workdir / "redis",
                                options.redis_cpus or options.server_cpus).start()
    procs: list[servers.ServerProcess] = []
    try:
        secret = {"AGENTCHAT_TOKEN_SECRET": secrets.token_hex(32)}  # shared: every process signs alike
        for i in range(n):
            procs.append(servers.agentchat_server(workdir, options.server_cpus, bus=redis.url,
                                                  store=workdir / "store", tag=f"agentchat-{i}", env=secret).start())
        tokens, _ = await fixtures.setup_agentchat(procs[0].http_base, fixture)
        jobs = fanout_jobs(fixture, tokens, [p.ws_url for p in procs], options, "agentchat", rate_msgs)

        samples: list[tuple[float, float]] = []  # (servers, redis-server) CPU seconds, window start and end

        def cpu() -> float:
            assert redis.proc is not None
            sample = (sum(p.cpu_seconds() for p in procs), servers.proc_cpu_seconds(redis.proc.pid))
            samples.append(sample)
            return sum(sample)

        row = await drive_fanout(jobs, options, label, progress, cpu, procs[0].pid)
    finally:
        for p in procs:
            p.stop()
        redis.stop()
    delivered = row["delivered_per_s"] * options.duration
    if len(samples) >= 2 and delivered:
        row["server_cpu_ms_per_1000"] = round((samples[-1][0] - samples[0][0]) * 1e6 / delivered, 3)
        row["redis_cpu_ms_per_1000"] = round((samples[-1][1] - samples[0][1]) * 1e6 / delivered, 3)
    return row


async def _inprocess_run(fixture: fixtures.Fixture, options: Options, rate_msgs: float | None,
                         progress: Progress, label: str) -> dict[str, Any]:
    """The same fan-out on one in-process AgentChat: the row, with its CPU per 1,000 deliveries."""
    workdir = options.workdir / f"multi-ref-{time.monotonic_ns()}"
    proc = servers.agentchat_server(workdir, options.server_cpus, tag="agentchat-reference").start()
    try:
        tokens, _ = await fixtures.setup_agentchat(proc.http_base, fixture)
        jobs = fanout_jobs(fixture, tokens, [proc.ws_url], options, "agentchat", rate_msgs)
        samples: list[float] = []

        def cpu() -> float:
            samples.append(proc.cpu_seconds())
            return samples[-1]

        row = await drive_fanout(jobs, options, label, progress, cpu, proc.pid)
    finally:
        proc.stop()
    delivered = row["delivered_per_s"] * options.duration
    if delivered and len(samples) >= 2:
        row["cpu_ms_per_1000"] = round((samples[-1] - samples[0]) * 1e6 / delivered, 3)
    return row


async def sessions_across_processes(options: Options) -> dict[str, Any]:
    """``--sessions`` idle authenticated sessions over as many AgentChat processes on one Redis bus as
    the open-files limit requires (at least ``--mp-processes``); clients come from several 127.0.0.x
    addresses. Reports the servers' RSS per session and the time to connect them all."""
    cap = servers.fd_hard_limit() - 200
    sessions = options.idle_sessions
    n = max(options.mp_processes, math.ceil(sessions / cap))
    label = f"agentchat x{n} (redis)"
    progress = Progress(f"sessions {label}")
    workdir = options.workdir / f"sessions-{time.monotonic_ns()}"
    redis = servers.RedisServer(servers.free_port(), workdir / "redis",
                                options.redis_cpus or options.server_cpus).start()
    procs: list[servers.ServerProcess] = []
    try:
        secret = {"AGENTCHAT_TOKEN_SECRET": secrets.token_hex(32)}  # shared: every process signs alike
        for i in range(n):
            procs.append(servers.agentchat_server(workdir, options.server_cpus, bus=redis.url,
                                                  store=workdir / "store", tag=f"agentchat-{i}", env=secret).start())
        progress.update(0.0, "registering agents")
        _, tokens = await fixtures.setup_agentchat(procs[0].http_base, None,
                                                   extra_agents=min(sessions, options.idle_agents))
        await asyncio.sleep(1.0)
        rss_before = [p.rss_bytes() for p in procs]
        jobs: list[dict[str, Any]] = []
        for i, (proc, share) in enumerate(zip(procs, split(list(range(sessions)), n))):
            jobs += session_jobs("agentchat", proc.ws_url, tokens[i:] + tokens[:i], len(share), options, "idle",
                                 200 // n or 1)
        generators = Generators(jobs, options, "sessions-mp")
        try:
            progress.update(0.1, f"opening {sessions:,} sessions on {n} processes")
            started = time.monotonic()
            ready = await generators.start()
            connect_s = time.monotonic() - started
            opened = sum(r["clients"] for r in ready)
            await asyncio.sleep(2.0)
            rss_after = [p.rss_bytes() for p in procs]
            generators.send("go 0")
            generators.send("stop")
            await generators.collect(60)
        finally:
            await generators.stop()
    finally:
        for p in procs:
            p.stop()
        redis.stop()
    row: dict[str, Any] = {"workload": "sessions-mp", "server": label, "processes": n, "sessions": opened,
                           "failures": sum(r["failures"] for r in ready), "connect_s": round(connect_s, 1),
                           "rss_mb": round(sum(rss_after) / 2**20, 1)}
    if opened:
        row["kb_per_session"] = round((sum(rss_after) - sum(rss_before)) / opened / 1024, 2)
    first = next((r["first_failure"] for r in ready if r["failures"]), "")
    if first:
        row["first_error"] = first
    progress.done(f"{opened:,} sessions on {n} processes in {connect_s:.1f} s, {row.get('kb_per_session')} KB each")
    return row


async def watch_peek(http: Any, base: str, ws_url: str, channel: str, opened_at: float) -> dict[str, Any]:
    """Open a peek on ``channel`` as a human would (dev payments: confirm pays at once), watch it over
    the peeker's socket, and report when its deadline outcome arrived relative to the deadline."""
    import websockets

    from agentchat import crypto
    from agentchat.core.frames import split_frames
    from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

    await asyncio.sleep(max(0.0, opened_at - time.monotonic()))
    browser_key = crypto.b64e(X25519PrivateKey.generate().public_key().public_bytes_raw())
    opened = await fixtures.post_json(http, base + "/api/v1/peeks",
                                      {"channel": channel, "peeker_public_key": browser_key})
    token, peek_id = opened["token"], opened["peek"]["id"]
    deadline = None
    async with websockets.connect(ws_url, max_size=1 << 24) as ws:
        await ws.send(json.dumps({"type": "hello", "token": token}))
        confirmed = await fixtures.post_json(http, f"{base}/api/v1/peeks/{peek_id}/confirm", {}, token)
        deadline = confirmed["peek"]["deadline"]
        async for data in ws:
            for frame in split_frames(data):
                if frame.get("type") != "peek":
                    continue
                peek = frame["peek"]
                if peek["state"] in ("countdown", "awaiting_payment"):
                    continue
                return {"state": peek["state"], "observed_ms": time.time() * 1000 - deadline,
                        "server_ms": peek["updated_at"] - deadline
                        if peek["state"] in ("awaiting_key", "capturing") else None}
    return {"state": "closed", "observed_ms": None, "server_ms": None}


async def peek_under_load(fixture: fixtures.Fixture, options: Options, saturated: float | None) -> dict[str, Any]:
    """Peeks opened while fan-out runs at half load: how far from the deadline their outcomes land.

    ``--peeks`` peeks are opened (one per channel, round robin) over the first seconds after warm-up;
    nobody refuses, so each one's outcome is the deadline's (``awaiting_key``: the bench's agents hand over
    no key, so the hold is released later as ``no_key``; that later end is not measured). Measured:
    the peeker's socket receiving the first state after the countdown minus the peek's ``deadline``
    (both on this machine's clock), and the server's own ``updated_at`` of that state minus the deadline.
    """
    rate = options.peek_rate or int((saturated or 90_000) / 2)
    progress = Progress("peek agentchat")
    window = options.peek_window
    stagger = min(5.0, window / 2)
    run_options = dataclasses.replace(options, duration=window + stagger + 5.0)
    fixture = fixture_for(fixture, options, rate, run_options.duration)
    env = {"AGENTCHAT_PEEK_REFUSAL_WINDOW_SECONDS": f"{window:g}"}
    with Target("agentchat", run_options, env) as target:
        if target.process is None:
            return {"workload": "peek", "server": "agentchat", "note": "needs a server started by the bench"}
        tokens, _ = await fixtures.setup_agentchat(target.http_base, fixture)
        jobs = fanout_jobs(fixture, tokens, [target.ws_url], run_options, "agentchat", rate / options.group)
        channels = list(fixture.channels)
        first = time.monotonic() + 2.0 + options.warmup  # generators start about 1.5 s after this
        timeout = aiohttp.ClientTimeout(total=window + 60)
        async with aiohttp.ClientSession(timeout=timeout) as http:
            watchers = [asyncio.ensure_future(watch_peek(http, target.http_base, target.ws_url,
                                                         channels[i % len(channels)],
                                                         first + stagger * i / max(1, options.peeks)))
                        for i in range(options.peeks)]
            row = await drive_fanout(jobs, run_options, "peek", progress, target.cpu_seconds)
            outcomes = await asyncio.gather(*watchers, return_exceptions=True)
    observed, server_side, states, failures = Histogram(), Histogram(), Counter(), []
    for outcome in outcomes:
        if isinstance(outcome, BaseException):
            failures.append(f"{type(outcome).__name__}: {outcome}"[:200])
            continue
        states[outcome["state"]] += 1
        if outcome["observed_ms"] is not None:
            observed.record(max(0.0, outcome["observed_ms"]) * 1000)
        if outcome["server_ms"] is not None:
            server_side.record(max(0.0, outcome["server_ms"]) * 1000)
    result: dict[str, Any] = {
        "workload": "peek", "server": "agentchat", "peeks": len(outcomes), "outcomes": dict(states),
        "late_ms": latency_summary_ms(observed), "server_late_ms": latency_summary_ms(server_side),
        "delivered_per_s": row["delivered_per_s"], "target_per_s": rate, "window_s": window,
    }
    notes = [row["note"]] if row.get("note") else []
    if failures:
        notes.append(f"{len(failures)} peeks failed: {failures[0]}")
    if notes:
        result["note"] = "; ".join(notes)
    progress.done(f"outcomes p99 {result['late_ms']['p99']} ms after the deadline")
    return result
