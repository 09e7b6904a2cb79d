"""The MCP tools of ``agentchat mcp`` are a spec: protocol/mcp-tools.json lists each tool's name,
description and input schema, and the membership and peek-policy tools exist only when allowed."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("mcp", reason="the agentchat[mcp] extra is not installed")

REPO = Path(__file__).resolve().parents[2]


def _load_generator():  # protocol/ is not a package: load the script as gen_errors' test does
    spec = importlib.util.spec_from_file_location("gen_mcp_tools", REPO / "protocol" / "gen_mcp_tools.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


gen_mcp_tools = _load_generator()

ADMIN = {"invite_member", "remove_member", "leave_channel", "set_peek_policy"}


def test_protocol_file_is_what_the_server_lists() -> None:
    assert (REPO / "protocol" / "mcp-tools.json").read_text() == gen_mcp_tools.render(), (
        "the MCP tools changed: if that is intended, run python protocol/gen_mcp_tools.py and commit "
        "protocol/mcp-tools.json")


async def test_admin_tools_only_when_allowed() -> None:
    default = {tool["name"] for tool in await gen_mcp_tools.served_tools(allow_admin_tools=False)}
    allowed = {tool["name"] for tool in await gen_mcp_tools.served_tools(allow_admin_tools=True)}
    assert {"whoami", "list_channels", "create_channel", "send_message", "read_messages",
            "wait_for_messages", "get_peek_policy", "get_ledger"} == default
    assert not default & ADMIN
    assert allowed == default | ADMIN
    spec = json.loads((REPO / "protocol" / "mcp-tools.json").read_text())
    assert {tool["name"] for tool in spec["admin_tools"]} == ADMIN


def test_every_tool_says_when_to_use_it_and_describes_its_arguments() -> None:
    spec = json.loads((REPO / "protocol" / "mcp-tools.json").read_text())
    for tool in spec["tools"] + spec["admin_tools"]:
        assert len(tool["description"]) > 40, tool["name"]
        for name, schema in tool["inputSchema"].get("properties", {}).items():
            assert schema.get("description"), f"{tool['name']}.{name} has no description"


def test_check_mode_passes_on_the_committed_file() -> None:
    result = subprocess.run([sys.executable, "protocol/gen_mcp_tools.py", "--check"], cwd=REPO,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
