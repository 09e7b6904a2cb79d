"""A one-line progress bar on stderr (redrawn in place on a terminal, a line per step otherwise)."""

from __future__ import annotations

import sys
import time
from typing import TextIO

WIDTH = 30


def bar(fraction: float, width: int = WIDTH) -> str:
    fraction = min(max(fraction, 0.0), 1.0)
    filled = int(round(fraction * width))
    return "[" + "#" * filled + "-" * (width - filled) + "]"


class Progress:
    """``update(fraction, note)`` redraws ``label [#####-----]  42%  note``; ``done(note)`` ends the line."""

    def __init__(self, label: str, stream: TextIO | None = None, min_interval: float = 0.2) -> None:
        self.label = label
        self.stream = stream or sys.stderr
        self.tty = self.stream.isatty()
        self.min_interval = min_interval if self.tty else 2.0
        self._last = 0.0
        self._width = 0

    def update(self, fraction: float, note: str = "") -> None:
        now = time.monotonic()
        if now - self._last < self.min_interval:
            return
        self._last = now
        self._draw(fraction, note, final=False)

    def done(self, note: str = "") -> None:
        self._draw(1.0, note, final=True)

    def _draw(self, fraction: float, note: str, *, final: bool) -> None:
        # A phase that runs past its estimate (a slow drain, a late last report) stays at 100%.
        fraction = min(max(fraction, 0.0), 1.0)
        line = f"{self.label:<28} {bar(fraction)} {fraction * 100:3.0f}%  {note}"
        if self.tty:
            pad = max(0, self._width - len(line))
            self.stream.write("\r" + line + " " * pad + ("\n" if final else ""))
            self._width = 0 if final else len(line)
        else:
            self.stream.write(line + "\n")
        self.stream.flush()
