"""``agentchat`` / ``python -m agentchat``: run the server, or try the product from a terminal.

    agentchat serve                     # embedded defaults: 127.0.0.1:8080, ./data, no Redis
    agentchat keygen --key alice.key    # then register, channel create, send, history, listen
"""

from __future__ import annotations

import argparse
import gc
import logging
import sys

from agentchat.config import ConfigError, load_settings, redact_url


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


def _serve(args: argparse.Namespace) -> int:
    from agentchat.server.app import build_app, run

    try:
        settings = load_settings(host=args.host, port=args.port, bus=args.bus, store=args.store,
                                 payments=args.payments, log_level=args.log_level)
    except ConfigError as exc:
        print(f"agentchat: {exc}", file=sys.stderr)
        return 2
    logging.basicConfig(level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        import uvloop

        uvloop.install()
    except ImportError:  # uvloop is optional (not on Windows)
        pass
    open_files = raise_open_files_limit()
    print(f"AgentChat listening on http://{settings.host}:{settings.port} (bus {redact_url(settings.bus)}, "
          f"store {redact_url(settings.store)}, payments {redact_url(settings.payments)}, "
          f"open files {open_files if open_files is not None else 'unlimited'})", flush=True)
    if open_files is not None and open_files < FEW_OPEN_FILES:
        logging.getLogger("agentchat").warning(
            "this process may open only %d files, so it holds fewer than %d sessions at once; raise the "
            "hard limit (ulimit -Hn, LimitNOFILE= in a systemd unit, --ulimit nofile= for docker run)",
            open_files, open_files)
    app = build_app(settings)
    # What is loaded by now lives as long as the process: no collection needs to scan it again.
    gc.freeze()
    # Young collections every 10,000 allocations instead of 700: per-message objects die before they
    # are promoted, so full collections (40-60 ms of CPU each under fan-out, every ~2 s with the
    # defaults) become ten times rarer. They set the tail of delivery and peek-deadline latency.
    gc.set_threshold(10_000, 10, 10)
    run(app, settings.host, settings.port, shutdown_timeout=10.0)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="agentchat", description="End-to-end encrypted messaging for AI agents.")
    commands = parser.add_subparsers(dest="command", required=True)
    serve = commands.add_parser("serve", help="run the server (settings: flags, else AGENTCHAT_* variables)")
    serve.add_argument("--host", help="address to listen on (default 127.0.0.1)")
    serve.add_argument("--port", type=int, help="port (default 8080)")
    serve.add_argument("--bus", help="memory:// (default) or redis://host:port/db")
    serve.add_argument("--store", help="file://./data (default) or s3://bucket?endpoint=...")
    serve.add_argument("--payments", help="dev:// (default) or stripe://")
    serve.add_argument("--log-level", help="debug, info (default), warning, error")
    serve.set_defaults(run=_serve)
    from agentchat.client import cli

    cli.add_commands(commands)
    from agentchat.operations import commands as operations

    operations.add_commands(commands)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.run(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
