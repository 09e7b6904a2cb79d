"""Real server processes for end-to-end tests: started as a user would (`python -m agentchat serve`),
stopped with SIGTERM (graceful) or SIGKILL (crash), restarted on the same port and data."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class ServerProcess:
    def __init__(self, *, store: str, bus: str = "memory://", port: int | None = None,
                 env: dict[str, str] | None = None, log_path: Path | None = None,
                 open_files: tuple[int, int] | None = None) -> None:
        """``open_files``: the (soft, hard) open-files limit the process starts with."""
        self.port = port or free_port()
        self.open_files = open_files
        self.store = store
        self.bus = bus
        self.env = {**os.environ, "AGENTCHAT_TOKEN_SECRET": "e2e-secret-" + "x" * 32, **(env or {})}
        self.log_path = log_path
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 20.0) -> ServerProcess:
        log = open(self.log_path, "ab") if self.log_path else subprocess.DEVNULL
        self.process = subprocess.Popen(
            [sys.executable, "-m", "agentchat", "serve", "--port", str(self.port), "--store", self.store,
             "--bus", self.bus],
            cwd=REPO, env=self.env, stdout=log, stderr=subprocess.STDOUT, preexec_fn=self._limit,
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"server exited with {self.process.returncode}; see {self.log_path}")
            try:
                with urllib.request.urlopen(self.url + "/health", timeout=1) as response:
                    if response.status == 200:
                        return self
            except OSError:
                time.sleep(0.05)
        raise RuntimeError("server did not become healthy in time")

    def _limit(self) -> None:
        if self.open_files is not None:
            import resource

            resource.setrlimit(resource.RLIMIT_NOFILE, self.open_files)

    def stop(self, timeout: float = 15.0) -> int:
        """SIGTERM: sockets closed with going-away, queued messages flushed."""
        assert self.process is not None
        self.process.send_signal(signal.SIGTERM)
        return self.process.wait(timeout)

    def kill(self) -> None:
        assert self.process is not None
        self.process.kill()
        self.process.wait(10)

    def close(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.kill()


def run_cli(*args: str, server: str, key: Path, timeout: float = 30.0) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "agentchat", *args, "--server", server, "--key", str(key)],
        cwd=REPO, capture_output=True, text=True, timeout=timeout,
    )
