"""The store: durable objects (agents, channels, message segments, peeks, ledger) by key.

The interface is the part of S3 the product needs, so the local directory store and S3/R2 store are
interchangeable; both pass ``tests/contract/test_store_contract.py``. Keys are ``/``-separated paths
of printable ASCII (see ``keys.py``); values are opaque bytes.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import Protocol

DELETE_BATCH = 1000  # keys per request of ``delete_many`` (S3 DeleteObjects takes at most 1000)
LIST_PAGE = 1000  # keys per ``list`` request of ``pages`` / ``list_all`` (S3 ListObjectsV2 returns at most 1000)


class PreconditionFailed(Exception):
    """A conditional write lost: the object exists (``if_none_match``) or changed (``if_match``).

    Not an ``AgentChatError``: callers decide what it means (usually retry or ``conflict``).
    """


@dataclass(frozen=True, slots=True)
class StoredObject:
    data: bytes
    etag: str


class ObjectStore(Protocol):
    """Guarantees every implementation keeps:

    - ``put`` is atomic and durable when it returns: a reader sees the whole old or the whole new
      object, and a returned write survives a crash of the process.
    - ``put(..., if_none_match=True)`` succeeds for exactly one of several racing writers of a key;
      ``put(..., if_match=etag)`` only if the object still has that etag. Losers get
      ``PreconditionFailed`` and nothing is written.
    - ``list`` returns keys under ``prefix`` in ascending byte order, strictly after ``start_after``.
    - Transient failures are retried inside the implementation; what escapes is
      ``Unavailable('store_unavailable')``.
    """

    async def start(self) -> None: ...

    async def close(self) -> None: ...

    async def get(self, key: str) -> StoredObject | None: ...

    async def put(
        self, key: str, data: bytes, *, if_none_match: bool = False, if_match: str | None = None
    ) -> str:
        """Write ``data`` at ``key``; returns the new etag."""

    async def list(self, prefix: str, *, start_after: str = "", limit: int = 1000) -> list[str]: ...

    async def delete(self, key: str) -> None:
        """Remove ``key``; removing a missing key is not an error."""

    async def delete_many(self, keys: Sequence[str]) -> None:
        """Remove every key of ``keys``, in one request where the store has one (S3 DeleteObjects, up
        to ``DELETE_BATCH`` keys per request); missing keys are not an error, no keys: nothing to do.
        Every key is checked before anything is removed; a failure part way may leave some removed."""



async def pages(store: ObjectStore, prefix: str, *, start_after: str = "",
                limit: int | None = None) -> AsyncIterator[list[str]]:
    """The keys under ``prefix`` after ``start_after`` (the first ``limit`` of them), ascending, one
    ``list`` request at a time: for a caller that stops early or must not hold every key at once."""
    left = limit
    while left is None or left > 0:
        found = await store.list(prefix, start_after=start_after, limit=LIST_PAGE if left is None else min(LIST_PAGE, left))
        if not found:
            return
        yield found
        if left is not None:
            left -= len(found)
        start_after = found[-1]


async def list_all(store: ObjectStore, prefix: str, *, start_after: str = "", limit: int | None = None) -> list[str]:
    """Every key under ``prefix`` after ``start_after`` (the first ``limit`` of them), ascending."""
    return [key async for page in pages(store, prefix, start_after=start_after, limit=limit) for key in page]
