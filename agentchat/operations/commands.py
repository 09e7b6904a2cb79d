"""The operator subcommands, added to ``agentchat``'s parser by ``agentchat/__main__.py``.

    agentchat check --server https://chat.example.org     # the post-deployment checklist
    agentchat backup DEST --store URL                      # a running store into an empty DEST
    agentchat restore SRC --store URL                      # a backup into an empty store
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from typing import Any

from agentchat.config import redact_url

DEFAULT_SERVER = "http://127.0.0.1:8080"


def _store_url(location: str) -> str:
    """A store URL as ``serve --store`` takes it; a plain path means a directory."""
    if "://" in location:
        return location
    return "file://" + os.path.abspath(location)


def _check(args: argparse.Namespace) -> int:
    from agentchat.operations.check import run_check

    return asyncio.run(run_check(args.server, sys.stdout, timeout=args.timeout))


def _transfer(args: argparse.Namespace) -> int:
    from agentchat.store import store_from_url
    from agentchat.store import transfer

    store_url = _store_url(args.store)
    other_url = _store_url(args.location)
    if args.command == "backup":
        source_url, dest_url, action = store_url, other_url, transfer.backup
    else:
        source_url, dest_url, action = other_url, store_url, transfer.restore

    def progress(line: str) -> None:
        print(line, flush=True)

    async def run() -> int:
        try:
            source, dest = store_from_url(source_url), store_from_url(dest_url)
        except ValueError as exc:
            print(f"agentchat: {exc}", file=sys.stderr)
            return 2
        await source.start()
        await dest.start()
        try:
            print(f"{args.command}: {redact_url(source_url)} -> {redact_url(dest_url)}", flush=True)
            report = await action(source, dest, progress)
        except ValueError as exc:
            print(f"agentchat: {args.command}: {exc}", file=sys.stderr)
            return 1
        finally:
            await source.close()
            await dest.close()
        print(f"{args.command} done: {report.objects} objects, {report.bytes / 1e6:.2f} MB", flush=True)
        return 0

    try:
        return asyncio.run(run())
    except Exception as exc:  # AgentChatError('store_unavailable') and the like: one line, not a trace
        print(f"agentchat: {args.command} failed: {exc}", file=sys.stderr)
        return 1


def add_commands(commands: Any) -> None:
    check = commands.add_parser("check", help="run the post-deployment checklist against a live server "
                                              "with throwaway agents (cleans up after itself)")
    check.add_argument("--server", default=os.environ.get("AGENTCHAT_SERVER", DEFAULT_SERVER),
                       help="server URL (default $AGENTCHAT_SERVER or %(default)s)")
    check.add_argument("--timeout", type=float, default=30.0, help="seconds each step may take (default 30)")
    check.set_defaults(run=_check)
    store_default = os.environ.get("AGENTCHAT_STORE", "file://./data")
    backup = commands.add_parser("backup", help="copy a store (even while servers run) into an empty DEST")
    backup.add_argument("location", metavar="DEST", help="an empty directory, or a store URL (s3://bucket/prefix?...)")
    backup.add_argument("--store", default=store_default,
                        help="the store to back up, as serve takes it (default $AGENTCHAT_STORE or ./data)")
    backup.set_defaults(run=_transfer)
    restore = commands.add_parser("restore", help="copy a finished backup into an empty store")
    restore.add_argument("location", metavar="SRC", help="the backup's directory or store URL")
    restore.add_argument("--store", default=store_default,
                         help="the empty store to restore into (default $AGENTCHAT_STORE or ./data)")
    restore.set_defaults(run=_transfer)
