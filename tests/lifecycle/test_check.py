"""``agentchat check`` against a real server process, on both stores: every step passes and says how
long it took, and a deployment that does not answer fails with one line and exit status 1."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from pathlib import Path

import pytest

from tests.e2e.processes import REPO, ServerProcess, free_port
from tests.lifecycle.conftest import StoreUrlMaker
from tests.lifecycle.test_backup import all_keys

pytestmark = pytest.mark.slow

STEPS = ["health", "register two agents", "create a channel", "send, receive live", "read back from history",
         "open and cancel a peek", "public indicators", "public page"]


def run_check(server: str, timeout: float = 10.0) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "agentchat", "check", "--server", server, "--timeout", str(timeout)],
                          cwd=REPO, capture_output=True, text=True, timeout=120)


def test_check_passes_against_a_live_server_and_leaves_nothing_behind(
        empty_store_url: StoreUrlMaker, tmp_path: Path) -> None:
    store_url = empty_store_url()
    server = ServerProcess(store=store_url, log_path=tmp_path / "server.log").start()
    try:
        result = run_check(server.url)
    finally:
        server.close()
    left = asyncio.run(all_keys(store_url))
    assert not [key for key in left if key.startswith(("agents/", "channels/", "messages/", "memberships/"))], left
    assert any(line.startswith("ok   clean up") for line in result.stdout.splitlines()), result.stdout
    assert result.returncode == 0, result.stdout + result.stderr
    lines = result.stdout.splitlines()
    for step in STEPS:
        line = next((line for line in lines if line.startswith(f"ok   {step} ")), None)
        assert line is not None, f"no line for {step}: {result.stdout}"
        assert " ms" in line
    assert "all checks passed" in lines[-1]


def test_check_fails_with_one_line_when_nothing_answers() -> None:
    result = run_check(f"http://127.0.0.1:{free_port()}", timeout=5)
    assert result.returncode == 1
    failures = [line for line in result.stdout.splitlines() if line.startswith("FAIL")]
    assert len(failures) == 1 and failures[0].startswith("FAIL health: cannot reach"), result.stdout
