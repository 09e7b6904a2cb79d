"""One short fan-out run of the real tool against AgentChat (tiny numbers; nothing about speed)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_paced_fanout_smoke_run_against_agentchat(tmp_path: Path) -> None:
    # Paced, not saturated: a saturated run would send the small pool of sealed messages during the
    # warm-up on a fast machine and measure nothing.
    pytest.importorskip("picows")
    out = tmp_path / "out"
    result = subprocess.run(
        [sys.executable, "-m", "bench", "run", "paced", "--rate", "2000", "--server", "agentchat",
         "--agents", "20", "--group", "5",
         "--duration", "1", "--warmup", "0.5", "--pool", "200", "--processes", "1", "--window", "4",
         "--server-cpus", "none", "--load-cpus", "none", "--cache", str(tmp_path / "cache"), "--out", str(out)],
        cwd=REPO, capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stderr[-2000:]
    run = json.loads((out / "results.json").read_text())
    [row] = run["rows"]
    assert row["workload"] == "paced" and row["server"] == "agentchat" and row["target_per_s"] == 2000
    assert row["errors"] == 0, row.get("first_error")
    assert row["delivered_per_s"] > 0 and row["latency_ms"]["samples"] > 0
    assert "| agentchat |" in result.stdout
    assert (out / "results.md").exists()


@pytest.mark.slow
def test_peek_smoke_run_reports_outcomes_against_the_deadline(tmp_path: Path) -> None:
    pytest.importorskip("picows")
    out = tmp_path / "out"
    result = subprocess.run(
        [sys.executable, "-m", "bench", "run", "peek", "--server", "agentchat", "--agents", "20", "--group", "5",
         "--peeks", "3", "--peek-window", "2", "--peek-rate", "2000", "--warmup", "0.5", "--pool", "200",
         "--processes", "1", "--server-cpus", "none", "--load-cpus", "none", "--cache", str(tmp_path / "cache"),
         "--out", str(out)],
        cwd=REPO, capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stderr[-2000:]
    [row] = json.loads((out / "results.json").read_text())["rows"]
    assert row["workload"] == "peek" and row["peeks"] == 3, row
    assert sum(row["outcomes"].values()) == 3 and set(row["outcomes"]) <= {"awaiting_key", "capturing", "active"}, row
    assert row["late_ms"]["samples"] == 3


@pytest.mark.slow
def test_session_memory_breaks_down_idle_sessions() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "bench.session_memory", "--sessions", "20", "--warmup", "5", "--trace"],
        cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "25 sessions open" in result.stdout
    assert "agentchat.server.session.Session" in result.stdout  # one more per session, by type
    assert "B  agentchat" in result.stdout  # tracemalloc by owner


@pytest.mark.slow
def test_stalls_serves_agentchat_and_reports_when_stopped(tmp_path: Path) -> None:
    import signal
    import socket
    import time
    import urllib.request

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    process = subprocess.Popen(
        [sys.executable, "-m", "bench.stalls", "--census", "--", "--port", str(port),
         "--store", f"file://{tmp_path}/data"], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1) as response:
                    assert response.status == 200
                    break
            except OSError:
                assert time.monotonic() < deadline and process.poll() is None, "the server did not start"
                time.sleep(0.1)
        process.send_signal(signal.SIGINT)
        _, err = process.communicate(timeout=30)
    finally:
        process.kill()
    assert process.returncode == 0, err[-2000:]
    assert "loop lags over 3 ms" in err and "garbage collections: young" in err
