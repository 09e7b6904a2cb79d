"""The S3 store: Cloudflare R2, AWS S3, MinIO or any S3-compatible service, through aiobotocore.

URL: ``s3://BUCKET[/PREFIX]?endpoint=URL&region=REGION&access_key=ID&secret_key=SECRET&addressing=path``

- ``endpoint``: the service's URL; omit it for AWS S3. Cloudflare R2:
  ``https://<account_id>.r2.cloudflarestorage.com`` with ``region=auto``.
- ``region``: default ``us-east-1``.
- Credentials: ``access_key`` and ``secret_key`` in the URL (keep such a URL out of logs), else the
  usual AWS sources: ``AWS_ACCESS_KEY_ID`` / ``AWS_SECRET_ACCESS_KEY``, ``~/.aws``, an instance role.
- ``addressing``: ``path`` (default with an endpoint; what MinIO and local servers need) or ``virtual``.
- ``PREFIX``: every key is stored under it, so several deployments can share a bucket.

Conditional writes use ``If-None-Match: *`` and ``If-Match: <etag>`` on PutObject: a 412, or the 409
``ConditionalRequestConflict`` that S3 and R2 return while a concurrent conditional write is in
flight, becomes ``PreconditionFailed``.

Retries: throttling (503 SlowDown, 429), other 5xx, connection errors and timeouts are retried with
exponential backoff and full jitter, ``attempts`` times in all, then ``Unavailable('store_unavailable')``.
A conditional put whose earlier attempt failed in a way that may have written the object, and whose
retry then gets 412, reads the object back: if it holds exactly our bytes, the write was ours.

``ops`` counts operations, retries and failures (``put``, ``put.retry``, ``put.error``, ...).
"""

from __future__ import annotations

import asyncio
import collections
import logging
import re
from collections.abc import Awaitable, Callable, Sequence
from contextlib import AsyncExitStack
from typing import Any, TypeVar
from urllib.parse import parse_qsl, urlsplit

import aiohttp
from aiobotocore.config import AioConfig
from aiobotocore.session import AioSession, get_session
from botocore.exceptions import BotoCoreError, ClientError, HTTPClientError
from botocore.exceptions import ConnectionError as BotoConnectionError

from agentchat.core.backoff import Backoff
from agentchat.errors import AgentChatError, error
from agentchat.store.base import DELETE_BATCH, PreconditionFailed, StoredObject
from agentchat.store.local import check_key, check_prefix

log = logging.getLogger(__name__)

T = TypeVar("T")

ATTEMPTS = 5
BACKOFF_BASE = 0.1  # seconds; attempt n waits uniform(0, min(cap, base * 2**n))
BACKOFF_CAP = 2.0
PAGE_SIZE = 1000  # S3's maximum keys per ListObjectsV2 page

_BUCKET = re.compile(r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]")
_RETRYABLE_CODES = {
    "SlowDown", "InternalError", "ServiceUnavailable", "RequestTimeout", "Throttling",
    "ThrottlingException", "TooManyRequests", "RequestTimeTooSkewed", "InternalServerError",
}
_LOST_WRITE_CODES = {"PreconditionFailed", "ConditionalRequestConflict"}
# Connection failures, timeouts and broken responses; other BotoCoreErrors (no credentials, a bad
# parameter) are not worth retrying.
_TRANSPORT_ERRORS = (BotoConnectionError, HTTPClientError, aiohttp.ClientError, asyncio.TimeoutError, OSError)


def _status(exc: ClientError) -> int:
    return int(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0))


def _code(exc: ClientError) -> str:
    return str(exc.response.get("Error", {}).get("Code", ""))


_session: AioSession | None = None


def _shared_session() -> AioSession:
    # A session caches the service model it loads; a client made from a fresh one costs ~0.15 s.
    global _session
    if _session is None:
        _session = get_session()
    return _session


class S3Store:
    """An ``ObjectStore`` on an S3-compatible service: see the module docstring."""

    def __init__(
        self,
        bucket: str,
        *,
        prefix: str = "",
        endpoint: str | None = None,
        region: str = "us-east-1",
        access_key: str | None = None,
        secret_key: str | None = None,
        addressing: str | None = None,
        attempts: int = ATTEMPTS,
        backoff_base: float = BACKOFF_BASE,
        backoff_cap: float = BACKOFF_CAP,
        connect_timeout: float = 5.0,
        read_timeout: float = 30.0,
    ) -> None:
        if not _BUCKET.fullmatch(bucket):
            raise ValueError(f"store bucket {bucket!r} is not a valid bucket name")
        if (access_key is None) != (secret_key is None):
            raise ValueError("store: give both access_key and secret_key, or neither")
        if prefix:
            check_key(prefix)
            prefix += "/"
        self.bucket = bucket
        self.prefix = prefix
        self.location = f"s3://{bucket}/{prefix}" + (f" at {endpoint}" if endpoint else "")
        self.ops: collections.Counter[str] = collections.Counter()
        self._attempts = max(1, attempts)
        self._backoff_base = backoff_base
        self._backoff_cap = backoff_cap
        self.page_size = PAGE_SIZE  # keys per ListObjectsV2 request
        self.delete_batch = DELETE_BATCH  # keys per DeleteObjects request
        self._client_args: dict[str, Any] = {
            "endpoint_url": endpoint,
            "region_name": region,
            "aws_access_key_id": access_key,
            "aws_secret_access_key": secret_key,
            "config": AioConfig(
                retries={"total_max_attempts": 1, "mode": "standard"},  # we retry, see _retry
                connect_timeout=connect_timeout,
                read_timeout=read_timeout,
                max_pool_connections=64,
                s3={"addressing_style": addressing or ("path" if endpoint else "auto")},
                # Only the checksums S3 requires: older R2 and MinIO releases reject the others.
                request_checksum_calculation="when_required",
                response_checksum_validation="when_required",
            ),
        }
        self._stack: AsyncExitStack | None = None
        self._client: Any = None

    @classmethod
    def from_url(cls, url: str) -> S3Store:
        parts = urlsplit(url)
        if parts.scheme != "s3" or not parts.hostname:
            raise ValueError("store URL must look like s3://bucket?endpoint=https://...&region=...")
        params: dict[str, str] = {}
        for name, value in parse_qsl(parts.query, keep_blank_values=True):
            if name not in ("endpoint", "region", "access_key", "secret_key", "addressing"):
                raise ValueError(f"store URL: unknown parameter {name!r}")
            params[name] = value
        addressing = params.pop("addressing", None)
        if addressing not in (None, "path", "virtual"):
            raise ValueError(f"store URL: addressing must be path or virtual, not {addressing!r}")
        return cls(
            parts.netloc,
            prefix=parts.path.strip("/"),
            endpoint=params.get("endpoint") or None,
            region=params.get("region") or "us-east-1",
            access_key=params.get("access_key"),
            secret_key=params.get("secret_key"),
            addressing=addressing,
        )

    async def start(self) -> None:
        self._stack = AsyncExitStack()
        self._client = await self._stack.enter_async_context(
            _shared_session().create_client("s3", **self._client_args)
        )

    async def close(self) -> None:
        if self._stack is not None:
            await self._stack.aclose()
            self._stack = None
            self._client = None

    # -- operations ----------------------------------------------------------------------------

    async def get(self, key: str) -> StoredObject | None:
        check_key(key)
        full = self.prefix + key

        async def attempt() -> StoredObject | None:
            try:
                response = await self._client.get_object(Bucket=self.bucket, Key=full)
            except ClientError as exc:
                if _code(exc) in ("NoSuchKey", "404") or _status(exc) == 404:
                    return None
                raise
            async with response["Body"] as body:
                data = await body.read()
            return StoredObject(data, response["ETag"])

        return await self._retry("get", key, attempt)

    async def put(
        self, key: str, data: bytes, *, if_none_match: bool = False, if_match: str | None = None
    ) -> str:
        check_key(key)
        if if_none_match and if_match is not None:
            raise ValueError("put: give if_none_match or if_match, not both")
        data = bytes(data)
        args: dict[str, Any] = {"Bucket": self.bucket, "Key": self.prefix + key, "Body": data}
        if if_none_match:
            args["IfNoneMatch"] = "*"
        elif if_match is not None:
            args["IfMatch"] = if_match
        conditional = if_none_match or if_match is not None
        maybe_written = False  # an earlier attempt may have stored the object

        async def attempt() -> str:
            nonlocal maybe_written
            try:
                response = await self._client.put_object(**args)
            except ClientError as exc:
                if conditional and (_status(exc) in (409, 412) or _code(exc) in _LOST_WRITE_CODES):
                    if maybe_written:
                        current = await self.get(key)
                        if current is not None and current.data == data:
                            return current.etag  # our earlier attempt did write it
                    raise PreconditionFailed(f"{key}: {_code(exc) or _status(exc)}") from None
                if if_match is not None and (_status(exc) == 404 or _code(exc) == "NoSuchKey"):
                    raise PreconditionFailed(f"{key} does not exist") from None
                maybe_written = maybe_written or _status(exc) >= 500
                raise
            except _TRANSPORT_ERRORS:
                maybe_written = True
                raise
            return str(response["ETag"])

        return await self._retry("put", key, attempt)

    async def list(self, prefix: str, *, start_after: str = "", limit: int = 1000) -> list[str]:
        if limit < 1:
            raise ValueError(f"limit must be at least 1, got {limit}")
        check_prefix(prefix)
        keys: list[str] = []
        token: str | None = None
        strip = len(self.prefix)
        while len(keys) < limit:
            args: dict[str, Any] = {
                "Bucket": self.bucket,
                "Prefix": self.prefix + prefix,
                "MaxKeys": min(limit - len(keys), self.page_size),
            }
            if token is not None:
                args["ContinuationToken"] = token
            elif start_after:
                args["StartAfter"] = self.prefix + start_after
            page = await self._retry("list", prefix, lambda: self._client.list_objects_v2(**args))
            keys.extend(item["Key"][strip:] for item in page.get("Contents", ()))
            token = page.get("NextContinuationToken")
            if not page.get("IsTruncated") or token is None:
                break
        return keys[:limit]

    async def delete(self, key: str) -> None:
        check_key(key)
        await self._retry("delete", key, lambda: self._client.delete_object(Bucket=self.bucket, Key=self.prefix + key))

    async def delete_many(self, keys: Sequence[str]) -> None:
        for key in keys:
            check_key(key)
        unique = list(dict.fromkeys(keys))  # a key twice in one request is not portable
        batch = self.delete_batch
        for start in range(0, len(unique), batch):
            await self._delete_objects(unique[start : start + batch])

    async def _delete_objects(self, keys: list[str]) -> None:
        """One DeleteObjects request (retried). It answers 200 even when some keys failed: those are
        in ``Errors``, and are the only ones the next attempt sends again."""
        remaining = keys
        strip = len(self.prefix)

        async def attempt() -> None:
            nonlocal remaining
            response = await self._client.delete_objects(
                Bucket=self.bucket,
                Delete={"Objects": [{"Key": self.prefix + key} for key in remaining], "Quiet": True},
            )
            failed = response.get("Errors") or []
            if failed:
                remaining = [str(item.get("Key", ""))[strip:] for item in failed]
                first = failed[0]
                # As a ClientError, the first key's error code decides whether _retry tries again.
                message = f"{len(failed)} keys not deleted, {remaining[0]}: {first.get('Message', '')}"
                raise ClientError(
                    {
                        "Error": {"Code": first.get("Code", ""), "Message": message},
                        "ResponseMetadata": response.get("ResponseMetadata", {}),
                    },
                    "DeleteObjects",
                )

        label = keys[0] if len(keys) == 1 else f"{len(keys)} keys ({keys[0]} ...)"
        await self._retry("delete", label, attempt)

    # -- retries -------------------------------------------------------------------------------

    async def _retry(self, op: str, key: str, attempt: Callable[[], Awaitable[T]]) -> T:
        if self._client is None:
            raise RuntimeError("call start() before using the store")
        self.ops[op] += 1
        backoff = Backoff(self._backoff_base, self._backoff_cap)
        for n in range(self._attempts):
            try:
                return await attempt()
            except PreconditionFailed:
                raise
            except ClientError as exc:
                if not (_status(exc) >= 500 or _status(exc) == 429 or _code(exc) in _RETRYABLE_CODES):
                    self.ops[f"{op}.error"] += 1
                    raise self._unavailable(op, key, exc) from exc
                failure: BaseException = exc
            except _TRANSPORT_ERRORS as exc:
                failure = exc
            except BotoCoreError as exc:
                self.ops[f"{op}.error"] += 1
                raise self._unavailable(op, key, exc) from exc
            if n + 1 == self._attempts:
                self.ops[f"{op}.error"] += 1
                raise self._unavailable(op, key, failure) from failure
            self.ops[f"{op}.retry"] += 1
            delay = backoff.next_delay()
            log.info("store: %s %s failed (%r); retry %d in %.2f s", op, key, failure, n + 1, delay)
            await asyncio.sleep(delay)
        raise AssertionError("unreachable")

    def _unavailable(self, op: str, key: str, exc: BaseException) -> AgentChatError:
        detail = f"{_code(exc)} ({_status(exc)})" if isinstance(exc, ClientError) else repr(exc)
        return error("store_unavailable", f"Storage at {self.location} failed to {op} {key}: {detail}")
