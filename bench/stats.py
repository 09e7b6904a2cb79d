"""Numbers without I/O: a mergeable latency histogram, percentiles, rates and ratios.

Load generator processes record latencies in microseconds into a :class:`Histogram` (log-linear
buckets, under 1% relative error), send it to the orchestrator as JSON, and the orchestrator merges
them before reading percentiles, so no process ships millions of samples.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence

# Bucket width relative to the value: 1%. Values below 1 µs share bucket 0.
GROWTH = 1.01
_LOG_GROWTH = math.log(GROWTH)


def bucket_of(value_us: float) -> int:
    """The histogram bucket holding ``value_us`` (>= 0)."""
    if value_us <= 1.0:
        return 0
    return int(math.log(value_us) / _LOG_GROWTH) + 1


def bucket_value(index: int) -> float:
    """A representative value of bucket ``index``: the geometric middle of its bounds."""
    if index <= 0:
        return 1.0
    low = GROWTH ** (index - 1)
    return low * math.sqrt(GROWTH)


class Histogram:
    """Counts of latencies (microseconds) per log bucket; merge by adding counts."""

    __slots__ = ("counts", "total", "max_us", "min_us")

    def __init__(self) -> None:
        self.counts: dict[int, int] = {}
        self.total = 0
        self.max_us = 0.0
        self.min_us = math.inf

    def record(self, value_us: float) -> None:
        index = bucket_of(value_us)
        self.counts[index] = self.counts.get(index, 0) + 1
        self.total += 1
        if value_us > self.max_us:
            self.max_us = value_us
        if value_us < self.min_us:
            self.min_us = value_us

    def record_many(self, values_us: Iterable[float]) -> None:
        for value in values_us:
            self.record(value)

    def merge(self, other: Histogram) -> None:
        for index, count in other.counts.items():
            self.counts[index] = self.counts.get(index, 0) + count
        self.total += other.total
        self.max_us = max(self.max_us, other.max_us)
        self.min_us = min(self.min_us, other.min_us)

    def percentile(self, p: float) -> float | None:
        """The value below which ``p`` percent of the samples fall (nearest rank); None if empty.

        The top percentile (100) is the exact maximum; others are their bucket's middle value,
        clamped to the recorded minimum and maximum.
        """
        if not 0 <= p <= 100:
            raise ValueError(f"percentile {p} is not between 0 and 100")
        if self.total == 0:
            return None
        if p == 100:
            return self.max_us
        rank = max(1, math.ceil(p / 100 * self.total))
        seen = 0
        for index in sorted(self.counts):
            seen += self.counts[index]
            if seen >= rank:
                return min(max(bucket_value(index), self.min_us), self.max_us)
        return self.max_us

    def to_json(self) -> dict[str, object]:
        return {"counts": {str(k): v for k, v in sorted(self.counts.items())}, "total": self.total,
                "max_us": self.max_us, "min_us": self.min_us if self.total else 0.0}

    @classmethod
    def from_json(cls, data: Mapping[str, object]) -> Histogram:
        hist = cls()
        counts = data.get("counts", {})
        assert isinstance(counts, Mapping)
        hist.counts = {int(k): int(v) for k, v in counts.items()}
        hist.total = int(data.get("total", sum(hist.counts.values())))  # type: ignore[arg-type]
        hist.max_us = float(data.get("max_us", 0.0))  # type: ignore[arg-type]
        hist.min_us = float(data.get("min_us", 0.0)) if hist.total else math.inf  # type: ignore[arg-type]
        return hist


def exact_percentile(values: Sequence[float], p: float) -> float | None:
    """Nearest-rank percentile of raw samples (the reference the histogram is checked against)."""
    if not values:
        return None
    ordered = sorted(values)
    rank = max(1, math.ceil(p / 100 * len(ordered)))
    return ordered[rank - 1]


def latency_summary_ms(hist: Histogram) -> dict[str, float | None]:
    """p50 / p99 / p999 / max in milliseconds (None where there were no samples)."""
    def ms(value: float | None) -> float | None:
        return None if value is None else round(value / 1000, 3)

    return {"p50": ms(hist.percentile(50)), "p99": ms(hist.percentile(99)),
            "p999": ms(hist.percentile(99.9)), "max": ms(hist.percentile(100)), "samples": hist.total}


def rate(count: float, seconds: float) -> float:
    return count / seconds if seconds > 0 else 0.0


def ratio(ours: float | None, theirs: float | None) -> float | None:
    """``ours / theirs``, or None when either side is missing or the peer measured zero."""
    if ours is None or theirs is None or theirs == 0:
        return None
    return ours / theirs


def cpu_share(cpu_seconds: float, wall_seconds: float) -> float:
    """Fraction of one core a process used over a wall-clock span."""
    return cpu_seconds / wall_seconds if wall_seconds > 0 else 0.0
