"""A store wrapper that counts operations and failures (for ``/metrics`` and the persistence bench)."""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence

from agentchat.store.base import DELETE_BATCH, ObjectStore, PreconditionFailed, StoredObject


class CountingStore:
    """Passes every call through to ``inner``; counts it in ``ops`` (and in ``errors`` if it raised,
    a lost conditional write not counting as an error). ``delete_many`` counts as the requests it
    takes on S3: one ``delete`` per ``DELETE_BATCH`` keys."""

    def __init__(self, inner: ObjectStore, ops: Counter[str], errors: Counter[str]) -> None:
        self.inner = inner
        self.ops = ops
        self.errors = errors

    async def start(self) -> None:
        await self.inner.start()

    async def close(self) -> None:
        await self.inner.close()

    async def get(self, key: str) -> StoredObject | None:
        self.ops["get"] += 1
        try:
            return await self.inner.get(key)
        except Exception:
            self.errors["get"] += 1
            raise

    async def put(self, key: str, data: bytes, *, if_none_match: bool = False, if_match: str | None = None) -> str:
        self.ops["put"] += 1
        try:
            return await self.inner.put(key, data, if_none_match=if_none_match, if_match=if_match)
        except PreconditionFailed:
            raise
        except Exception:
            self.errors["put"] += 1
            raise

    async def list(self, prefix: str, *, start_after: str = "", limit: int = 1000) -> list[str]:
        self.ops["list"] += 1
        try:
            return await self.inner.list(prefix, start_after=start_after, limit=limit)
        except Exception:
            self.errors["list"] += 1
            raise

    async def delete(self, key: str) -> None:
        self.ops["delete"] += 1
        try:
            await self.inner.delete(key)
        except Exception:
            self.errors["delete"] += 1
            raise

    async def delete_many(self, keys: Sequence[str]) -> None:
        if not keys:
            return
        requests = math.ceil(len(keys) / DELETE_BATCH)
        self.ops["delete"] += requests
        try:
            await self.inner.delete_many(keys)
        except Exception:
            self.errors["delete"] += requests
            raise
