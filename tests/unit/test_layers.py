"""Imports run one way: the sans-I/O core and the backends never import the server, the SDK or the page;
the page never imports the server (it is given what it needs)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[2] / "agentchat"

# Package (or module) -> the agentchat packages it must never import.
FORBIDDEN = {
    "core": {"server", "client", "web", "store", "bus", "payments"},
    "store": {"server", "client", "web"},
    "bus": {"server", "client", "web", "store"},
    "payments": {"server", "client", "web"},
    "web": {"server", "client"},
    "client": {"server", "web", "store", "bus", "payments"},
}


def _imports(path: Path) -> set[str]:
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
    return {name for name in found if name.startswith("agentchat.")}


@pytest.mark.parametrize("layer", sorted(FORBIDDEN))
def test_no_import_runs_upward(layer: str) -> None:
    wrong = []
    for path in sorted((PACKAGE / layer).rglob("*.py")):
        for name in _imports(path):
            if name.split(".")[1] in FORBIDDEN[layer]:
                wrong.append(f"{path.relative_to(PACKAGE)} imports {name}")
    assert wrong == []


def test_the_bench_uses_only_the_servers_public_hooks() -> None:
    """``bench/`` measures the product from outside: the command line, the SDK, the wire codec and
    ``server/embedded.py``, never the server's internals."""
    allowed = {"agentchat.server.embedded", "agentchat.server.embedded.embedded_server"}
    wrong = []
    for path in sorted((PACKAGE.parent / "bench").glob("*.py")):
        for name in _imports(path):
            if name.startswith("agentchat.server") and name not in allowed:
                wrong.append(f"bench/{path.name} imports {name}")
    assert wrong == []
