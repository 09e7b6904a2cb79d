"""Bus implementations, chosen by URL: ``memory://`` (one process) or ``redis://host:port/db``."""

from __future__ import annotations

from urllib.parse import urlsplit

from agentchat.bus.base import Bus


def bus_from_url(url: str) -> Bus:
    scheme = urlsplit(url).scheme
    if scheme == "memory":
        from agentchat.bus.memory import MemoryBus

        return MemoryBus()
    if scheme in ("redis", "rediss"):
        from agentchat.bus.redis import RedisBus  # imports redis only when it is used

        return RedisBus(url)
    raise ValueError(f"bus {url!r}: use memory:// or redis://host:port/db")
