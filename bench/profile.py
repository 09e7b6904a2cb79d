"""``python -m bench.profile FILE [--top N]``: read a py-spy collapsed-stack file (``--profile``)
and print where the samples are: by own frame (self time) and by any frame on the stack (total)."""

from __future__ import annotations

import argparse
import sys
from collections import Counter
from pathlib import Path


def parse(text: str) -> list[tuple[list[str], int]]:
    """Lines ``frame;frame;frame COUNT`` -> (frames outermost first, count)."""
    stacks = []
    for line in text.splitlines():
        stack, _, count = line.rpartition(" ")
        if stack and count.isdigit():
            stacks.append((stack.split(";"), int(count)))
    return stacks


def short(frame: str) -> str:
    """``send_frame (aiohttp/_websocket/writer.py:123)`` -> ``send_frame (aiohttp/_websocket/writer.py)``"""
    name, _, where = frame.partition(" (")
    where = where.rstrip(")")
    path = where.rsplit(":", 1)[0]
    for marker in ("site-packages/", "/work/main/", "lib/python3.11/"):
        if marker in path:
            path = path.split(marker, 1)[1]
    return f"{name} ({path})" if path else name


def summarize(stacks: list[tuple[list[str], int]], top: int = 25) -> str:
    total = sum(count for _, count in stacks) or 1
    own: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    for frames, count in stacks:
        if not frames:
            continue
        own[short(frames[-1])] += count
        for frame in {short(f) for f in frames}:
            inclusive[frame] += count
    lines = [f"{total} samples", "", f"{'self %':>7}  function"]
    lines += [f"{100 * n / total:6.1f}%  {name}" for name, n in own.most_common(top)]
    lines += ["", f"{'total %':>7}  function"]
    lines += [f"{100 * n / total:6.1f}%  {name}" for name, n in inclusive.most_common(top)]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.profile")
    parser.add_argument("file", type=Path)
    parser.add_argument("--top", type=int, default=25)
    args = parser.parse_args(argv)
    print(summarize(parse(args.file.read_text()), args.top))
    return 0


if __name__ == "__main__":
    sys.exit(main())
