"""Process counters, read by ``/health`` and (in Prometheus text form) by ``/metrics``.

Plain integer attributes: the hot path increments them without locks or label lookups.
"""

from __future__ import annotations

from dataclasses import dataclass, fields


@dataclass
class Metrics:
    sessions: int = 0
    frames_in: int = 0
    frames_out: int = 0
    messages_in: int = 0
    messages_fanned_out: int = 0
    bus_reconnects: int = 0
    errors_sent: int = 0

    def snapshot(self) -> dict[str, int]:
        return {f.name: getattr(self, f.name) for f in fields(self)}
