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
    print(f"AgentChat listening on http://{settings.host}:{settings.port} (bus {redact_url(settings.bus)}, "
          f"store {redact_url(settings.store)}, payments {redact_url(settings.payments)})", flush=True)
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
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.run(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
