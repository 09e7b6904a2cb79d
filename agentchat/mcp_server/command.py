"""``agentchat mcp``: run the MCP server for one agent (stdio by default, or streamable HTTP on
127.0.0.1). The ``mcp`` SDK is imported only when the command runs, with a one-line error if the
``agentchat[mcp]`` extra is missing.

    agentchat mcp --key alice.key --name alice          # first run: makes the key (0600) and registers
    agentchat mcp --key alice.key --allow-admin-tools   # also the membership and peek-policy tools
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
from collections.abc import Callable
from typing import Any

from agentchat import crypto
from agentchat.client.agent import Agent, AgentChatClientError

MISSING_SDK = "agentchat: 'agentchat mcp' needs the MCP SDK; install it with: pip install 'agentchat[mcp]'"
SDK_MODULES = ("mcp", "mcp_types", "pydantic", "anyio", "starlette", "uvicorn", "sse_starlette", "httpx2")


def add_command(commands: Any, common: Callable[[argparse.ArgumentParser], None]) -> None:
    mcp = commands.add_parser("mcp", help="serve this agent to an MCP client (Claude Desktop, Claude Code, "
                                          "IDE agents): tools to talk in channels; keys stay here")
    common(mcp)
    mcp.add_argument("--name", help="first run: make the key file if missing and register the agent under "
                                    "this name")
    mcp.add_argument("--allow-admin-tools", action="store_true",
                     help="also offer invite_member, remove_member, leave_channel and set_peek_policy")
    mcp.add_argument("--refuse-peeks", action="store_true",
                     help="start with the peek policy 'refuse' (each refusal costs the refusal fee)")
    mcp.add_argument("--http", type=int, metavar="PORT",
                     help="serve streamable HTTP on 127.0.0.1:PORT/mcp instead of stdio")
    mcp.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    try:
        from agentchat.mcp_server.server import build_server  # noqa: F401 - the SDK, loaded only here
    except ImportError as exc:
        if (exc.name or "").split(".")[0] in SDK_MODULES:
            print(MISSING_SDK, file=sys.stderr)
            return 2
        raise
    # stdout carries the protocol on stdio: every log line goes to stderr.
    logging.basicConfig(stream=sys.stderr, level=logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return asyncio.run(serve(args))
    except KeyboardInterrupt:
        return 130
    except SetupError as exc:
        print(f"agentchat: {exc}", file=sys.stderr)
        return 1
    except AgentChatClientError as exc:  # the server refused to start the session
        print(f"agentchat: {exc.code}: {exc.message}", file=sys.stderr)
        return 1


class SetupError(Exception):
    pass


def load_or_create_keys(path: str, name: str | None) -> tuple[crypto.AgentKeys, bool]:
    """The agent's keys, and whether they were made just now (then the agent must register)."""
    if os.path.exists(path):
        return crypto.AgentKeys.load(path), False
    if not name:
        raise SetupError(f"no key file at {path}; pass --name NAME to make one and register the agent, or run "
                         f"'agentchat keygen --key {path}' and 'agentchat register NAME --key {path}'")
    keys = crypto.AgentKeys.generate()
    keys.save(path)  # 0600, never replaces an existing file
    return keys, True


async def sign_in(agent: Agent, created: bool, name: str | None) -> None:
    if not created:
        try:
            await agent.login()
            return
        except AgentChatClientError as exc:
            if exc.code != "agent_not_found" or not name:
                raise SetupError(f"cannot log in to {agent.server}: {exc.code}: {exc.message}"
                                 + ("; pass --name NAME to register this key" if exc.code == "agent_not_found"
                                    else "")) from None
    await agent.register(name or "")


async def serve(args: argparse.Namespace) -> int:
    from agentchat.mcp_server.bridge import Bridge
    from agentchat.mcp_server.server import build_server

    keys, created = load_or_create_keys(args.key, args.name)
    async with Agent(args.server, keys, peek_policy=not args.refuse_peeks) as agent:
        bridge = Bridge(agent)
        await bridge.start(lambda: sign_in(agent, created, args.name))
        server = build_server(bridge, allow_admin_tools=args.allow_admin_tools)
        try:
            if args.http:
                await server.run_streamable_http_async(host="127.0.0.1", port=args.http)
            else:
                await server.run_stdio_async()
        finally:
            await bridge.close()
    return 0
