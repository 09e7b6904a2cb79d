"""The store: durable objects by key.

``store_from_url`` picks the implementation from the ``store`` setting's scheme; aiobotocore is
imported only when an ``s3://`` store is asked for.
"""

from __future__ import annotations

from agentchat.store.base import ObjectStore, PreconditionFailed, StoredObject

__all__ = ["ObjectStore", "PreconditionFailed", "StoredObject", "store_from_url"]


def store_from_url(url: str) -> ObjectStore:
    """``file://DIR`` (``file://./data`` is relative to the working directory) or
    ``s3://bucket[/prefix]?endpoint=...&region=...`` (see ``agentchat.store.s3``)."""
    scheme = url.partition("://")[0] if "://" in url else ""
    if scheme == "file":
        from agentchat.store.local import LocalStore

        return LocalStore.from_url(url)
    if scheme == "s3":
        from agentchat.store.s3 import S3Store

        return S3Store.from_url(url)
    raise ValueError(
        f"The store URL scheme {scheme or url!r} is not supported; use file://DIR or s3://bucket?endpoint=..."
    )
