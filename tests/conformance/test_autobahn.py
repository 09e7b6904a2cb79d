"""The Autobahn|Testsuite's fuzzing client, cases 1-7 and 9, against AgentChat's own WebSocket layer.

The suite (PyPI's ``autobahntestsuite``) runs on Python 2.7 only: ``scripts/autobahn.sh`` installs it
into ``.venv/autobahn`` (``scripts/bootstrap.sh test`` runs it too); where no Python 2.7 with pip can
be had, this test skips with the script's reason. The server is ``echo_server.py``: the layer that
serves ``/api/v1/ws``, with limits raised for the 9.* cases (16 MiB messages, 65,536 fragments).

Cases 1-7 take ~15 s and 9.* ~2 min on one core: all run. Cases 10 and 12/13 are left out (10 is a
single auto-fragmentation case; 12/13 need permessage-deflate, which is never negotiated here).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
CASES = ["1.*", "2.*", "3.*", "4.*", "5.*", "6.*", "7.*", "9.*"]
CASE_COUNT = 300  # what autobahntestsuite 0.8.2 has in those groups: every one must have run

# The only cases allowed to be NON-STRICT, and why.
NON_STRICT = {
    # The invalid UTF-8 is in the first part of a frame whose rest arrives seconds later; the suite
    # wants the connection failed before the frame ends. The layer reads a frame's payload once it is
    # whole (unmasking and checking it in one C call each): it fails the connection at the end of that
    # frame, which RFC 6455 allows ("MAY" fail fast), instead of checking every partial read.
    "6.4.3": "invalid UTF-8 inside an unfinished frame is found when the frame is whole",
    "6.4.4": "invalid UTF-8 inside an unfinished frame is found when the frame is whole",
}
GOOD = {"OK", "INFORMATIONAL"}


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _install() -> tuple[str, Path]:
    """Python 2.7 and the site-packages directory that hold wstest; skips when there is none."""
    done = subprocess.run([str(REPO / "scripts" / "autobahn.sh")], capture_output=True, text=True, timeout=420)
    if done.returncode != 0:
        pytest.skip("Autobahn|Testsuite unavailable: " + (done.stderr.strip().splitlines() or ["?"])[-1])
    prefix = Path(done.stdout.strip().splitlines()[-1])
    python = next(prefix.glob(".installed-*")).read_text().strip()
    return python, prefix / "lib" / "python2.7" / "site-packages"


@pytest.mark.slow
@pytest.mark.timeout(1200)
def test_autobahn_fuzzingclient_cases_1_to_7_and_9(tmp_path: Path) -> None:
    python, site_packages = _install()
    port = _free_port()
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    server = subprocess.Popen([sys.executable, "-m", "tests.conformance.echo_server", str(port)], cwd=REPO,
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        assert server.stdout is not None
        assert "echo serving" in server.stdout.readline()
        spec = {"outdir": str(tmp_path / "reports"), "cases": CASES, "exclude-cases": [],
                "exclude-agent-cases": {},
                "servers": [{"agent": "AgentChat", "url": f"ws://127.0.0.1:{port}/"}]}
        (tmp_path / "spec.json").write_text(json.dumps(spec))
        # wstest's own entry point, with the prefix as a site directory (its .pth files included).
        run = ("import site, sys; site.addsitedir(sys.argv.pop(1)); sys.argv[0] = 'wstest'; "
               "from autobahntestsuite.wstest import run; sys.exit(run())")
        started = time.monotonic()
        done = subprocess.run([python, "-c", run, str(site_packages), "-m", "fuzzingclient", "-s", "spec.json"],
                              cwd=tmp_path, capture_output=True, text=True, timeout=1000)
        assert done.returncode == 0, done.stderr[-2000:]
        elapsed = time.monotonic() - started
    finally:
        server.terminate()
        server.wait(10)
    results = json.loads((tmp_path / "reports" / "index.json").read_text())["AgentChat"]
    counts: dict[str, int] = {}
    for result in results.values():
        counts[result["behavior"]] = counts.get(result["behavior"], 0) + 1
    print(f"Autobahn fuzzingclient {', '.join(CASES)}: {len(results)} cases in {elapsed:.0f} s: "
          + ", ".join(f"{n} {name}" for name, n in sorted(counts.items())))
    assert len(results) == CASE_COUNT
    bad = {case: (r["behavior"], r["behaviorClose"]) for case, r in results.items()
           if not ((r["behavior"] in GOOD or (r["behavior"] == "NON-STRICT" and case in NON_STRICT))
                   and r["behaviorClose"] in GOOD)}
    assert bad == {}
