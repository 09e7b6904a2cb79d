"""dev:// payments (no money moves) are refused on an address other than loopback unless asked for."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from agentchat.config import ConfigError, load_settings

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("host", ["127.0.0.1", "127.0.0.2", "localhost", "::1"])
def test_dev_payments_on_loopback_start(host: str) -> None:
    assert load_settings(env={}, host=host).payments == "dev://"


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "10.0.0.5", "example.com"])
def test_dev_payments_on_a_public_address_are_refused_unless_allowed(host: str) -> None:
    with pytest.raises(ConfigError, match="free"):
        load_settings(env={}, host=host)
    assert load_settings(env={"AGENTCHAT_ALLOW_DEV_PAYMENTS_PUBLIC": "1"}, host=host).allow_dev_payments_public
    assert load_settings(env={}, host=host, payments="stripe://").host == host
    with pytest.raises(ConfigError, match="1 or 0"):
        load_settings(env={"AGENTCHAT_ALLOW_DEV_PAYMENTS_PUBLIC": "maybe"}, host=host)


def test_the_command_says_why_and_exits_without_a_traceback(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("AGENTCHAT_")}
    env["PYTHONPATH"] = str(REPO)
    done = subprocess.run([sys.executable, "-m", "agentchat", "serve", "--host", "0.0.0.0", "--port", "0",
                           "--store", f"file://{tmp_path}/data"],
                          env=env, cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert done.returncode != 0
    assert "dev:// payments move no money" in done.stderr and "--allow-dev-payments-on-public-address" in done.stderr
    assert "Traceback" not in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1
