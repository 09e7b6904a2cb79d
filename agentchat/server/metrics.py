"""Process metrics, read by ``/health`` and, in Prometheus text form, by ``/metrics``.

The hot path increments plain integer attributes (no locks, no label lookups); a collector turns them
into Prometheus families when scraped. Histograms are observed per batch or per sampled message only.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field

from prometheus_client import CollectorRegistry, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

# One message in this many has its publish-to-fan-out latency observed.
LATENCY_SAMPLE_EVERY = 16

_COUNTERS = {
    "frames_in": "WebSocket frames received from clients",
    "frames_out": "frames sent to clients (several may share one WebSocket message)",
    "messages_in": "messages accepted for sequencing",
    "messages_fanned_out": "messages delivered by the bus to this process for its local sockets",
    "bus_reconnects": "times the bus connection was lost and restored",
    "errors_sent": "error answers sent on REST and sockets",
}


@dataclass
class Metrics:
    sessions: int = 0
    frames_in: int = 0
    frames_out: int = 0
    messages_in: int = 0
    messages_fanned_out: int = 0
    bus_reconnects: int = 0
    errors_sent: int = 0
    store_ops: Counter[str] = field(default_factory=Counter)
    store_errors: Counter[str] = field(default_factory=Counter)
    registry: CollectorRegistry = field(default_factory=CollectorRegistry, repr=False)

    def __post_init__(self) -> None:
        self.fanout_latency = Histogram(
            "agentchat_fanout_latency_seconds", "from accepting a message to handing it to local sockets (sampled)",
            registry=self.registry,
            buckets=(0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0))
        self.batch_messages = Histogram(
            "agentchat_batch_messages", "messages per group-commit batch", registry=self.registry,
            buckets=(1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000))
        self.batch_flush_seconds = Histogram(
            "agentchat_batch_flush_seconds", "time to store one group-commit batch", registry=self.registry,
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 5.0))
        self.registry.register(_Collector(self))

    def snapshot(self) -> dict[str, object]:
        data: dict[str, object] = {name: getattr(self, name) for name in ("sessions", *_COUNTERS)}
        data["store_ops"] = dict(self.store_ops)
        data["store_errors"] = dict(self.store_errors)
        return data

    def exposition(self) -> bytes:
        return generate_latest(self.registry)


class _Collector:
    def __init__(self, metrics: Metrics) -> None:
        self.metrics = metrics

    def collect(self) -> Iterator[Metric]:
        m = self.metrics
        yield GaugeMetricFamily("agentchat_sessions", "open WebSocket sessions on this process", value=m.sessions)
        for name, text in _COUNTERS.items():
            yield CounterMetricFamily(f"agentchat_{name}", text, value=getattr(m, name))
        ops = CounterMetricFamily("agentchat_store_operations", "store operations by kind", labels=["op"])
        for op, count in sorted(m.store_ops.items()):
            ops.add_metric([op], count)
        yield ops
        errors = CounterMetricFamily("agentchat_store_errors", "failed store operations by kind", labels=["op"])
        for op, count in sorted(m.store_errors.items()):
            errors.add_metric([op], count)
        yield errors
