"""CPU time of the WebSocket frame parser on the path of every message: ``python -m bench.frame_parse``.

Reads a typical ``send`` frame (a sealed 256-byte message: 616 bytes of JSON, masked), alone and 16
in one read, with ``FrameParser.feed``; prints the best of several runs in process CPU time, so other
work on the machine inflates it less than a wall-clock figure. ``--against DIR`` also measures the
parser of another checkout (``DIR/agentchat/core/rfc6455.py`` or the older ``core/websocket.py``),
interleaved with this one.
"""

from __future__ import annotations

import argparse
import importlib.util
import time
import timeit
from pathlib import Path
from types import ModuleType

import orjson
from websockets.frames import Frame, Opcode

HERE = Path(__file__).resolve().parents[1]


def _codec(root: Path) -> ModuleType:
    for name in ("rfc6455.py", "websocket.py"):
        path = root / "agentchat" / "core" / name
        if path.exists():
            spec = importlib.util.spec_from_file_location(f"codec_{abs(hash(root))}", path)
            assert spec is not None and spec.loader is not None
            module = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(module)
            return module
    raise SystemExit(f"no frame parser under {root}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--against", type=Path, help="another checkout to compare with")
    args = parser.parse_args()
    codecs = {"this": _codec(HERE)}
    if args.against:
        codecs["against"] = _codec(args.against)
    send = orjson.dumps({"type": "send", "ref": "r1", "channel": "ch_" + "a" * 22, "client_id": "c" * 16,
                         "envelope": {"epoch": 1, "nonce": "n" * 16, "ciphertext": "x" * 360, "sig": "s" * 86}})
    frame = Frame(Opcode.TEXT, send).serialize(mask=True)
    for label, data, count, frames in (("1 send frame a read", frame, 200_000, 1),
                                       ("16 send frames a read", frame * 16, 20_000, 16)):
        best: dict[str, float] = {}
        for _ in range(5):
            for name, codec in codecs.items():
                reader = codec.FrameParser(1 << 20)
                seconds = min(timeit.repeat(lambda: reader.feed(data), number=count, repeat=3,
                                            timer=time.process_time)) / count / frames
                best[name] = min(best.get(name, seconds), seconds)
        line = ", ".join(f"{name} {seconds * 1e6:.3f} µs" for name, seconds in best.items())
        print(f"{label} ({len(send)}-byte payload), per frame: {line}")


if __name__ == "__main__":
    main()
