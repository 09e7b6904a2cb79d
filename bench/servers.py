"""The servers under test: AgentChat and the peers in ``bench/peers/``, each a child process on a
free port of 127.0.0.1, pinned to the server cores with ``taskset`` where it exists.

The peers install themselves on first use from their own pinned manifests: ``npm ci`` for the Node
ones (package.json + package-lock.json), ``pip install -r requirements.txt`` for python-socketio.
"""

from __future__ import annotations

import os
import resource
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
REPO = BENCH_DIR.parent
PEERS_DIR = BENCH_DIR / "peers"
CLK_TCK = os.sysconf("SC_CLK_TCK")

SERVERS = ("agentchat", "node-ws", "socketio-node", "socketio-py")
PEERS = SERVERS[1:]
PROTOCOL = {"agentchat": "agentchat", "node-ws": "ws", "socketio-node": "socketio", "socketio-py": "socketio"}


class ServerError(RuntimeError):
    """A server could not be installed or started."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def pinned(command: list[str], cpus: str | None) -> list[str]:
    """``command`` run under ``taskset -c cpus`` (when taskset exists and cpus are given)."""
    if cpus and shutil.which("taskset"):
        return ["taskset", "-c", cpus, *command]
    return command


def raise_fd_limit() -> None:
    """Lift the soft open-files limit to the hard one (every socket is a file descriptor)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def fd_hard_limit() -> int:
    return resource.getrlimit(resource.RLIMIT_NOFILE)[1]


def proc_cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process (all its threads), from /proc."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def parse_cpu_list(cpus: str | None) -> list[int]:
    """``"0"``, ``"0,2"``, ``"0-3"`` -> CPU numbers (empty for None: not pinned)."""
    found: list[int] = []
    for part in (cpus or "").split(","):
        if "-" in part:
            low, high = part.split("-", 1)
            found.extend(range(int(low), int(high) + 1))
        elif part.strip():
            found.append(int(part))
    return found


def cpu_ticks(cpus: list[int]) -> dict[str, int]:
    """Clock ticks of these CPUs from /proc/stat: ``tasks`` (user + nice + system: time some process
    ran), ``irq`` (interrupts and softirqs, where the kernel does loopback TCP work that no process is
    charged for) and ``total``."""
    ticks = {"tasks": 0, "irq": 0, "total": 0, "cpus": max(1, len(cpus))}
    wanted = {f"cpu{n}" for n in cpus}
    with open("/proc/stat") as f:
        for line in f:
            parts = line.split()
            if parts and parts[0] in wanted:
                user, nice, system, idle, iowait, irq, softirq, steal = (int(v) for v in parts[1:9])
                ticks["tasks"] += user + nice + system
                ticks["irq"] += irq + softirq
                ticks["total"] += user + nice + system + idle + iowait + irq + softirq + steal
    return ticks


def core_usage(before: dict[str, int], after: dict[str, int], server_cpu: float | None) -> dict[str, float]:
    """``server_core_busy`` (share of the server cores not idle) and ``foreign_cpu`` (share that went
    to processes other than the server: other work on a shared machine) between two samples."""
    total = after["total"] - before["total"]
    if total <= 0:
        return {}
    tasks = (after["tasks"] - before["tasks"]) / total
    irq = (after["irq"] - before["irq"]) / total
    usage = {"server_core_busy": round(tasks + irq, 2)}
    if server_cpu is not None:
        # server_cpu is in cores; the shares above are of all the server cores together
        usage["foreign_cpu"] = round(max(0.0, tasks - server_cpu / before.get("cpus", 1)), 2)
    return usage


def proc_rss_bytes(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


# ---------------------------------------------------------------------------------- installs


def ensure_node_peer(name: str, log: object = None) -> Path:
    """``npm ci`` in ``bench/peers/<name>`` unless its node_modules matches the lock file."""
    directory = PEERS_DIR / name
    if shutil.which("node") is None or shutil.which("npm") is None:
        raise ServerError(f"{name} needs Node.js and npm (apt-get install -y nodejs npm)")
    lock = directory / "package-lock.json"
    installed = directory / "node_modules" / ".package-lock.json"
    if not installed.exists() or installed.stat().st_mtime < lock.stat().st_mtime:
        print(f"bench: installing {name} (npm ci)...", file=sys.stderr, flush=True)
        result = subprocess.run(["npm", "ci", "--no-audit", "--no-fund", "--loglevel=error"], cwd=directory,
                                capture_output=True, text=True)
        if result.returncode != 0:
            raise ServerError(f"npm ci in {directory} failed: {result.stderr.strip()[-500:]}")
    return directory


def ensure_python_requirements(requirements: Path, probe: str) -> None:
    """``pip install -r requirements`` into this interpreter unless ``import probe`` already works."""
    try:
        __import__(probe)
        return
    except ImportError:
        pass
    print(f"bench: installing {requirements.relative_to(REPO)} (pip)...", file=sys.stderr, flush=True)
    result = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "-r", str(requirements)],
                            capture_output=True, text=True)
    if result.returncode != 0:
        raise ServerError(f"pip install -r {requirements} failed: {result.stderr.strip()[-500:]}")


def ensure_installed(server: str) -> None:
    if server in ("node-ws", "socketio-node"):
        ensure_node_peer(server)
    elif server == "socketio-py":
        ensure_python_requirements(PEERS_DIR / "socketio-py" / "requirements.txt", "socketio")


# ---------------------------------------------------------------------------------- processes


@dataclass
class ServerProcess:
    """One running server; ``ws_url`` is where the load connects."""

    name: str
    command: list[str]
    port: int
    cwd: Path
    env: dict[str, str]
    log_path: Path
    ws_path: str
    health_path: str | None = None
    proc: subprocess.Popen[bytes] | None = None
    _log: object = field(default=None, repr=False)

    @property
    def ws_url(self) -> str:
        return f"ws://127.0.0.1:{self.port}{self.ws_path}"

    @property
    def http_base(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def start(self, timeout: float = 60.0) -> ServerProcess:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        log = open(self.log_path, "wb")
        self._log = log
        self.proc = subprocess.Popen(self.command, cwd=self.cwd, env={**os.environ, **self.env},
                                     stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                     preexec_fn=raise_fd_limit)
        deadline = time.monotonic() + timeout
        while not self._answers():
            if self.proc.poll() is not None:
                raise ServerError(f"{self.name} exited with {self.proc.returncode}: {self.log_tail()}")
            if time.monotonic() > deadline:
                self.stop()
                raise ServerError(f"{self.name} did not answer on port {self.port}: {self.log_tail()}")
            time.sleep(0.05)
        return self

    def _answers(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=0.5):
                pass
        except OSError:
            return False
        if self.health_path is None:
            return True
        try:
            with urllib.request.urlopen(self.http_base + self.health_path, timeout=2) as response:
                return response.status == 200
        except OSError:
            return False

    def log_tail(self, lines: int = 15) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def cpu_seconds(self) -> float:
        return proc_cpu_seconds(self.pid) if self.proc is not None else 0.0

    def rss_bytes(self) -> int:
        return proc_rss_bytes(self.pid) if self.proc is not None else 0

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self._log is not None:
            self._log.close()  # type: ignore[attr-defined]
            self._log = None


def agentchat_server(workdir: Path, cpus: str | None, *, bus: str = "memory://", store: Path | None = None,
                     tag: str = "agentchat", env: dict[str, str] | None = None) -> ServerProcess:
    """``python -m agentchat serve`` on a free port with a store directory under ``workdir``.

    The per-address limit of the auth routes is raised and the per-address socket cap lifted (every
    bench agent registers from 127.0.0.1, and a source address carries up to 20,000 sockets);
    everything else runs with the defaults.
    """
    port = free_port()
    store_dir = store or (workdir / f"{tag}-store")
    command = pinned([sys.executable, "-m", "agentchat", "serve", "--port", str(port), "--store", f"file://{store_dir}",
                      "--bus", bus, "--log-level", "warning"], cpus)
    env = {"AGENTCHAT_AUTH_REQUESTS_PER_SECOND": "1000000", "AGENTCHAT_MAX_CONNECTIONS_PER_ADDRESS": "0",
           "PYTHONPATH": str(REPO), **(env or {})}
    return ServerProcess(tag, command, port, REPO, env, workdir / f"{tag}.log", "/api/v1/ws", "/health")


def peer_server(name: str, workdir: Path, cpus: str | None) -> ServerProcess:
    ensure_installed(name)
    port = free_port()
    directory = PEERS_DIR / name
    env = {"PORT": str(port), "HOST": "127.0.0.1"}
    if name in ("node-ws", "socketio-node"):
        command = pinned(["node", "server.js"], cpus)
    elif name == "socketio-py":
        command = pinned([sys.executable, "server.py"], cpus)
    else:
        raise ServerError(f"unknown peer {name!r}")
    ws_path = "/" if name == "node-ws" else "/socket.io/?EIO=4&transport=websocket"
    return ServerProcess(name, command, port, directory, env, workdir / f"{name}.log", ws_path)


def make_server(name: str, workdir: Path, cpus: str | None) -> ServerProcess:
    if name == "agentchat":
        return agentchat_server(workdir, cpus)
    return peer_server(name, workdir, cpus)


@dataclass
class RedisServer:
    """A throw-away ``redis-server`` (no persistence) for the multi-process workload."""

    port: int
    workdir: Path
    cpus: str | None
    proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> RedisServer:
        exe = shutil.which("redis-server")
        if exe is None:
            raise ServerError("the multi-process workload needs redis-server (apt-get install -y redis-server)")
        self.workdir = self.workdir.resolve()  # redis-server resolves paths after changing to --dir
        self.workdir.mkdir(parents=True, exist_ok=True)
        output = open(self.workdir / "redis-output.log", "wb")
        self.proc = subprocess.Popen(
            pinned([exe, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
                    "--dir", str(self.workdir), "--logfile", str(self.workdir / "redis.log")], self.cpus),
            stdin=subprocess.DEVNULL, stdout=output, stderr=subprocess.STDOUT)
        output.close()
        deadline = time.monotonic() + 10
        while True:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=1) as s:
                    s.sendall(b"PING\r\n")
                    if s.recv(16).startswith(b"+PONG"):
                        return self
            except OSError:
                pass
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                said = ""
                for name in ("redis-output.log", "redis.log"):
                    try:
                        said += (self.workdir / name).read_text(errors="replace")[-300:]
                    except OSError:
                        pass
                raise ServerError(f"redis-server did not start on port {self.port}: {said.strip()}")
            time.sleep(0.05)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(10)
