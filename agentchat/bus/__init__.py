"""The bus: live fan-out between server processes and the small shared state they agree on.

``bus_from_url`` picks the implementation from the ``bus`` setting's scheme; the Redis client is
imported only when a ``redis://`` bus is asked for.
"""

from __future__ import annotations

from agentchat.bus.base import Bus, BusHandler

__all__ = ["Bus", "BusHandler", "bus_from_url"]


def bus_from_url(url: str) -> Bus:
    """``memory://`` (one process; ``memory://NAME`` shares a broker within the process) or
    ``redis://[:password@]host:port/db[?namespace=NAME]`` (``rediss://`` for TLS) or
    ``redis+cluster://host:port[,host:port...]/[?namespace=NAME]`` (a Redis Cluster)."""
    scheme = url.partition("://")[0] if "://" in url else ""
    if scheme == "memory":
        from agentchat.bus.memory import MemoryBus

        return MemoryBus.from_url(url)
    if scheme in ("redis", "rediss"):
        from agentchat.bus.redis import RedisBus

        return RedisBus.from_url(url)
    if scheme == "redis+cluster":
        from agentchat.bus.redis_cluster import RedisClusterBus

        return RedisClusterBus.from_url(url)
    raise ValueError(f"The bus URL scheme {scheme or url!r} is not supported; use memory://, redis://host:port/db or redis+cluster://host:port,.../.")
