"""Real external services for the tests: a ``redis-server`` process and moto's S3 server.

Each runs on a free port of 127.0.0.1 and is stopped by its fixture. The session fixtures at the end
(``redis_server``, ``s3_server``) can be imported into any ``conftest.py``::

    from tests.services import redis_server, s3_server  # noqa: F401

Tests that stop, kill or restart a server start their own with ``start_redis`` / ``start_s3``.
"""

from __future__ import annotations

import atexit
import logging
import os
import shutil
import signal
import socket
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# Servers still running when the interpreter exits (a test or script that died half-way) are killed,
# so no redis-server outlives the run that started it.
_running: set[RedisProcess] = set()


@atexit.register
def _kill_leftovers() -> None:
    for proc in list(_running):
        proc.kill()


class RedisProcess:
    """One ``redis-server`` child process on a fixed port; ``restart`` keeps the port (and, with
    ``appendonly``, the data: every write is fsynced to the append-only file)."""

    def __init__(self, port: int, directory: Path, appendonly: bool, extra: tuple[str, ...] = ()) -> None:
        self.port = port
        self.directory = directory
        self.appendonly = appendonly
        self.extra = extra
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def start(self, timeout: float = 10.0) -> None:
        exe = shutil.which("redis-server")
        if exe is None:
            raise RuntimeError("redis-server is not installed: apt-get install -y redis-server")
        args = [exe, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--daemonize", "no",
                "--dir", str(self.directory), "--logfile", str(self.directory / "redis.log")]
        if self.appendonly:
            args += ["--appendonly", "yes", "--appendfsync", "always"]
        else:
            args += ["--appendonly", "no"]
        args += self.extra
        self._proc = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                      stderr=subprocess.DEVNULL)
        _running.add(self)
        deadline = time.monotonic() + timeout
        while not self.ping():
            if self._proc.poll() is not None:
                raise RuntimeError(f"redis-server on port {self.port} exited: {self.log_tail()}")
            if time.monotonic() > deadline:
                self.kill()
                raise RuntimeError(f"redis-server on port {self.port} did not answer: {self.log_tail()}")
            time.sleep(0.01)

    def ping(self) -> bool:
        """True if the server answers PING (a server still loading its data answers -LOADING)."""
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=1) as s:
                s.sendall(b"PING\r\n")
                return s.recv(64).startswith(b"+PONG")
        except OSError:
            return False

    def stop(self) -> None:
        """Shut down gracefully (SIGTERM); what was not fsynced is lost, like a restart in production."""
        self._end(signal.SIGTERM)

    def kill(self) -> None:
        """Die at once (SIGKILL), as in a crash."""
        self._end(signal.SIGKILL)

    def pause(self) -> None:
        """Freeze the server (SIGSTOP): connections stay open and nothing answers, as in a hang."""
        assert self._proc is not None
        self._proc.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        assert self._proc is not None
        self._proc.send_signal(signal.SIGCONT)

    def restart(self) -> None:
        self.stop()
        self.start()

    def _end(self, sig: int) -> None:
        proc, self._proc = self._proc, None
        _running.discard(self)
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(sig)
        proc.send_signal(signal.SIGCONT)  # a paused server cannot act on SIGTERM
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()

    def log_tail(self, lines: int = 5) -> str:
        try:
            return " | ".join((self.directory / "redis.log").read_text().splitlines()[-lines:])
        except OSError:
            return "(no log)"


def start_redis(tmpdir: str | os.PathLike[str], appendonly: bool = False) -> RedisProcess:
    """Start ``redis-server`` on a free port, data (if any) and log under ``tmpdir``."""
    directory = Path(tmpdir)
    directory.mkdir(parents=True, exist_ok=True)
    for attempt in range(5):  # another program may take the port between choosing and binding it
        proc = RedisProcess(free_port(), directory, appendonly)
        try:
            proc.start()
            return proc
        except RuntimeError:
            if attempt == 4:
                raise
    raise AssertionError("unreachable")


class S3Server:
    """moto's S3 server in a thread of this process, with one bucket made (``bucket``, ``store_url``);
    ``create_bucket()`` makes more."""

    def __init__(self, bucket: str = "agentchat") -> None:
        from moto.server import ThreadedMotoServer

        logging.getLogger("werkzeug").setLevel(logging.WARNING)  # one line per request otherwise
        self._server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
        self._server.start()
        host, port = self._server.get_host_and_port()
        self.endpoint = f"http://{host}:{port}"
        self.region = "us-east-1"
        self.access_key = "test"
        self.secret_key = "test"
        self._client: Any = None
        self.bucket = self.create_bucket(bucket)

    def create_bucket(self, name: str | None = None) -> str:
        if self._client is None:  # made once: building a boto3 client costs about 0.4 s
            import boto3

            self._client = boto3.client(
                "s3", endpoint_url=self.endpoint, region_name=self.region,
                aws_access_key_id=self.access_key, aws_secret_access_key=self.secret_key)
        name = name or f"test-{uuid.uuid4().hex[:16]}"
        self._client.create_bucket(Bucket=name)
        return name

    @property
    def store_url(self) -> str:
        """The ``store`` setting for the bucket made at start."""
        return self.url(self.bucket)

    def url(self, bucket: str) -> str:
        """The ``store`` setting for ``bucket`` on this server."""
        return (f"s3://{bucket}?endpoint={self.endpoint}&region={self.region}"
                f"&access_key={self.access_key}&secret_key={self.secret_key}")

    def stop(self) -> None:
        if self._client is not None:
            self._client.close()
        self._server.stop()


def start_s3(bucket: str = "agentchat") -> S3Server:
    """Start moto's S3 server on a free port of 127.0.0.1 and make ``bucket`` on it."""
    return S3Server(bucket)


def _cluster_port() -> int:
    """A free port whose cluster-bus port (port + 10000) is free too: both at most 65535."""
    import random

    for _ in range(200):
        port = random.randint(20000, 55535)
        try:
            for candidate in (port, port + 10000):
                with socket.socket() as s:
                    s.bind(("127.0.0.1", candidate))
        except OSError:
            continue
        return port
    raise RuntimeError("no free pair of ports for a cluster node")


class RedisCluster:
    """A local Redis Cluster: ``masters`` masters with ``replicas`` replicas each, every node its own
    directory, no persistence. ``url`` is the ``redis+cluster://`` bus URL of its masters."""

    def __init__(self, directory: Path, masters: int = 3, replicas: int = 0) -> None:
        self.nodes: list[RedisProcess] = []
        try:
            for i in range(masters * (1 + replicas)):
                node_dir = directory / f"node{i}"
                node_dir.mkdir(parents=True, exist_ok=True)
                node = RedisProcess(_cluster_port(), node_dir, False,
                                    ("--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf",
                                     "--cluster-node-timeout", "1000"))
                node.start()
                self.nodes.append(node)
            exe = shutil.which("redis-cli")
            if exe is None:
                raise RuntimeError("redis-cli is not installed: apt-get install -y redis-tools")
            subprocess.run([exe, "--cluster", "create", *(f"127.0.0.1:{n.port}" for n in self.nodes),
                            "--cluster-replicas", str(replicas), "--cluster-yes"],
                           check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, timeout=60)
            self.wait_ok()
        except BaseException:
            self.stop()
            raise

    def command(self, node: RedisProcess, *args: str) -> str:
        out = subprocess.run(["redis-cli", "-p", str(node.port), *args], capture_output=True, timeout=10)
        return out.stdout.decode()

    def wait_ok(self, timeout: float = 30.0) -> None:
        """Until every running node reports the cluster ok and every replica is in sync."""
        deadline = time.monotonic() + timeout
        while True:
            running = [n for n in self.nodes if n.running]
            infos = [self.command(n, "CLUSTER", "INFO") for n in running]
            if all("cluster_state:ok" in info for info in infos) and all(
                "master_link_status:down" not in self.command(n, "INFO", "replication") for n in running
            ):
                return
            if time.monotonic() > deadline:
                raise RuntimeError(f"the cluster is not ok: {infos}")
            time.sleep(0.1)

    def role(self, node: RedisProcess) -> str:
        return self.command(node, "ROLE").split("\n", 1)[0].strip()

    def master_of(self, key: str) -> RedisProcess:
        """The running master serving ``key``'s slot (hash tag included)."""
        running = [n for n in self.nodes if n.running]
        slot = int(self.command(running[0], "CLUSTER", "KEYSLOT", key))
        for node in running:
            for line in self.command(node, "CLUSTER", "NODES").splitlines():
                fields = line.split()
                if "myself" in fields[2] and "master" in fields[2]:
                    for item in fields[8:]:
                        start, _, end = item.partition("-")
                        if start.isdigit() and int(start) <= slot <= int(end or start):
                            return node
        raise RuntimeError(f"no running master serves slot {slot}")

    def replica_of(self, master: RedisProcess) -> RedisProcess:
        for node in self.nodes:
            if node.running and node is not master:
                role = self.command(node, "ROLE").split()
                if role[0] == "slave" and int(role[2]) == master.port:
                    return node
        raise RuntimeError(f"no replica of {master.port}")

    @property
    def url(self) -> str:
        masters = [n for n in self.nodes if n.running and self.role(n) == "master"]
        return "redis+cluster://" + ",".join(f"127.0.0.1:{n.port}" for n in masters) + "/"

    def stop(self) -> None:
        for node in self.nodes:
            node.kill()


@pytest.fixture(scope="session")
def redis_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisCluster]:
    """A 3-master Redis Cluster without replicas for the whole session; isolate tests by namespace."""
    cluster = RedisCluster(tmp_path_factory.mktemp("redis-cluster"))
    yield cluster
    cluster.stop()


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisProcess]:
    """A Redis without persistence for the whole session; isolate tests by key namespace."""
    proc = start_redis(tmp_path_factory.mktemp("redis"))
    yield proc
    proc.stop()


@pytest.fixture(scope="session")
def s3_server() -> Iterator[S3Server]:
    """One S3 server for the session; give each test its own bucket (``create_bucket()``)."""
    server = start_s3()
    yield server
    server.stop()
