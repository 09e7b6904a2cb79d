"""Store implementations, chosen by URL: ``file://DIR`` (local directory) or ``s3://bucket?...``."""

from __future__ import annotations

from urllib.parse import urlsplit

from agentchat.store.base import ObjectStore


def store_from_url(url: str) -> ObjectStore:
    parts = urlsplit(url)
    if parts.scheme == "file":
        from agentchat.store.local import LocalStore

        # file://./data (relative) and file:///var/lib/agentchat (absolute) both work.
        return LocalStore((parts.netloc + parts.path) or ".")
    if parts.scheme == "s3":
        from agentchat.store.s3 import S3Store  # imports aiobotocore only when it is used

        return S3Store.from_url(url)
    raise ValueError(f"store {url!r}: use file://DIR or s3://bucket?endpoint=...")
