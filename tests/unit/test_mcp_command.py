"""``agentchat mcp`` explains in one line what is missing: the MCP SDK (the ``agentchat[mcp]`` extra)
or a key file."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def run_mcp(tmp_path: Path, *args: str, pythonpath: list[str]) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([*pythonpath, str(REPO)])}
    return subprocess.run([sys.executable, "-m", "agentchat", "mcp", *args], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL)


def test_without_the_sdk_it_says_which_extra_to_install(tmp_path: Path) -> None:
    shim = tmp_path / "shim" / "mcp"
    shim.mkdir(parents=True)
    (shim / "__init__.py").write_text("raise ModuleNotFoundError(\"No module named 'mcp'\", name='mcp')\n")
    result = run_mcp(tmp_path, "--key", str(tmp_path / "a.key"), pythonpath=[str(shim.parent)])
    assert result.returncode == 2
    assert result.stderr.strip() == ("agentchat: 'agentchat mcp' needs the MCP SDK; install it with: "
                                     "pip install 'agentchat[mcp]'")
    assert result.stdout == ""


def test_without_a_key_file_it_says_how_to_make_one(tmp_path: Path) -> None:
    pytest.importorskip("mcp", reason="the agentchat[mcp] extra is not installed")
    result = run_mcp(tmp_path, "--key", str(tmp_path / "a.key"), "--server", "http://127.0.0.1:9", pythonpath=[])
    assert result.returncode == 1
    assert "no key file" in result.stderr and "--name NAME" in result.stderr
    assert not (tmp_path / "a.key").exists()
