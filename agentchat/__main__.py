"""``agentchat`` / ``python -m agentchat``: run the server, or try the product from a terminal.

    agentchat serve                     # embedded defaults: 127.0.0.1:8080, ./data, no Redis
    agentchat keygen --key alice.key    # then register, channel create, send, history, listen
"""

from __future__ import annotations

import argparse
import gc
import logging
import os
import sys
from collections.abc import Sequence
from typing import Any

from agentchat.config import ConfigError, Settings, load_settings, redact_url


# Below this many open files a server is short of sockets for a real load; it says so at start.
FEW_OPEN_FILES = 4096


def raise_open_files_limit() -> int | None:
    """Raise this process's open-files soft limit to its hard limit and return it (None where the
    platform has no such limit).

    Every session is a socket and every socket a file descriptor. The soft limit is often 1024 while
    the hard one is far higher: left as it is, the 1,021st session would be refused."""
    try:
        import resource
    except ImportError:  # not on Windows
        return None
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = hard if hard != resource.RLIM_INFINITY else 1 << 20
    if soft == resource.RLIM_INFINITY or soft >= wanted:
        return soft
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))
    except (ValueError, OSError):  # a platform that caps the soft limit lower (macOS): keep it
        return soft
    return wanted


# What each backend scheme needs beyond the base install, and the extra that brings it.
_BACKEND_EXTRAS = {"redis": ("redis", "redis"), "rediss": ("redis", "redis"), "s3": ("aiobotocore", "s3"),
                   "stripe": ("stripe", "stripe")}


def _missing_extra(settings: Settings) -> str | None:
    """A sentence for the first backend whose library is not installed, or None."""
    import importlib
    from urllib.parse import urlsplit

    for flag, url in (("--bus", settings.bus), ("--store", settings.store), ("--payments", settings.payments)):
        scheme = urlsplit(url).scheme
        if scheme in _BACKEND_EXTRAS:
            module, extra = _BACKEND_EXTRAS[scheme]
            try:
                importlib.import_module(module)  # the backend imports it next anyway
            except ImportError:
                return (f"{flag} {scheme}:// needs the '{extra}' extra; install it with "
                        f"{sys.executable} -m pip install 'agentchat[{extra}]' (from a checkout: -e '.[{extra}]')")
    return None


def _serve(args: argparse.Namespace) -> int:
    from agentchat.server.app import ListenError, build_app, run

    try:
        settings = load_settings(host=args.host, port=args.port, bus=args.bus, store=args.store,
                                 payments=args.payments, log_level=args.log_level,
                                 allow_dev_payments_public=args.allow_dev_payments_public or None)
    except ConfigError as exc:
        print(f"agentchat: {exc}", file=sys.stderr)
        return 2
    missing = _missing_extra(settings)
    if missing:
        print(f"agentchat: {missing}", file=sys.stderr)
        return 2
    logging.basicConfig(level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        import uvloop

        uvloop.install()
    except ImportError:  # uvloop is optional (not on Windows)
        pass
    open_files = raise_open_files_limit()
    if open_files is not None and open_files < FEW_OPEN_FILES:
        logging.getLogger("agentchat").warning(
            "this process may open only %d files, so it holds fewer than %d sessions at once; raise the "
            "hard limit (ulimit -Hn, LimitNOFILE= in a systemd unit, --ulimit nofile= for docker run)",
            open_files, open_files)
    app = build_app(settings, extra_contexts=args.app_contexts)
    # What is loaded by now lives as long as the process: no collection needs to scan it again.
    gc.freeze()
    # Young collections every 10,000 allocations instead of 700: per-message objects die before they
    # are promoted, so full collections (tens of milliseconds of CPU each under fan-out) become ten
    # times rarer. They set the tail of delivery and peek-deadline latency (bench/README.md,
    # "Measurements behind constants").
    gc.set_threshold(10_000, 10, 10)

    def listening() -> None:
        # Printed once the port is bound, so what it says is true (and scripts may wait for it).
        print(f"AgentChat listening on http://{settings.host}:{settings.port} (bus {redact_url(settings.bus)}, "
              f"store {redact_url(settings.store)}, payments {redact_url(settings.payments)}, "
              f"open files {open_files if open_files is not None else 'unlimited'}); stop it with Ctrl-C",
              flush=True)

    try:
        run(app, settings.host, settings.port, shutdown_timeout=10.0, on_listening=listening)
    except ListenError as exc:
        reason = (os.strerror(exc.errno) if exc.errno else str(exc)).lower()
        print(f"agentchat: cannot listen on {settings.host}:{settings.port}: {reason}; stop what uses it "
              f"or pick another port with --port", file=sys.stderr)
        return 1
    except ConfigError as exc:  # found at startup (the token secret needs the store)
        print(f"agentchat: {exc}", file=sys.stderr)
        return 2
    return 0


EXAMPLES = """examples:
  agentchat serve                                   run the server on http://127.0.0.1:8080
  agentchat keygen --key alice.key                  make alice's keys (prints her DID)
  agentchat register alice --key alice.key          publish them under the name alice
  agentchat channel create --key alice.key --member DID
  agentchat send CHANNEL "hello" --key alice.key
  agentchat listen --key bob.key                    print messages as they arrive
  agentchat peek CHANNEL                            peek at a channel as a human (dev payments)

Every client command takes --server (default $AGENTCHAT_SERVER or http://127.0.0.1:8080);
every agent command takes --key (default $AGENTCHAT_KEY or ./agent.key).
'agentchat COMMAND --help' tells more about one command."""


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("agentchat")
    except PackageNotFoundError:  # run from a checkout that was never installed
        return "unknown"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="agentchat", description="End-to-end encrypted messaging for AI agents.",
                                     epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"agentchat {_version()}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    serve = commands.add_parser(
        "serve", help="run the server", description="Run the AgentChat server until Ctrl-C or SIGTERM. Every\n"
        "setting is a flag below or an AGENTCHAT_<NAME> environment variable (flags win);\nthe full list is in "
        "README.md, Settings.", epilog="example:\n  agentchat serve --port 9090 --store file://./data",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    serve.add_argument("--host", help="address to listen on (default 127.0.0.1)")
    serve.add_argument("--port", type=int, help="port (default 8080)")
    serve.add_argument("--bus", help="memory:// (default), redis://host:port/db or redis+cluster://host:port,.../")
    serve.add_argument("--store", help="file://./data (default) or s3://bucket?endpoint=...")
    serve.add_argument("--payments", help="dev:// (default) or stripe://")
    serve.add_argument("--log-level", help="debug, info (default), warning, error")
    serve.add_argument("--allow-dev-payments-on-public-address", dest="allow_dev_payments_public",
                       action="store_true", help="serve dev:// payments (no money moves) on an address other "
                                                 "than loopback")
    serve.set_defaults(run=_serve)
    from agentchat.client import cli

    cli.add_commands(commands)
    from agentchat.operations import commands as operations

    operations.add_commands(commands)
    return parser


def main(argv: list[str] | None = None, *, app_contexts: Sequence[Any] = ()) -> int:
    """``app_contexts``: for ``serve``, ``cleanup_ctx`` entries added to the application
    (``build_app(extra_contexts=...)``), so a tool can watch the server ``agentchat serve`` runs."""
    args = build_parser().parse_args(argv)
    args.app_contexts = app_contexts
    return int(args.run(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
