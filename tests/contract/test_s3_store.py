"""What only the S3 store does: retry a flaky service, tell its own lost reply from a lost race, page
through listings, keep to a key prefix. Faults come from a proxy in front of moto's S3 server."""

from __future__ import annotations

from collections.abc import AsyncIterator

import aiohttp
import pytest
from aiohttp import web

from agentchat.errors import Unavailable
from agentchat.store.base import PreconditionFailed
from agentchat.store.s3 import S3Store
from tests.services import S3Server, free_port

_HOP_HEADERS = {"host", "content-length", "transfer-encoding", "connection", "expect", "content-encoding"}


def _s3_error(status: int, code: str) -> web.Response:
    body = f'<?xml version="1.0" encoding="UTF-8"?><Error><Code>{code}</Code><Message>{code}</Message></Error>'
    return web.Response(status=status, body=body.encode(), content_type="application/xml")


class FaultyProxy:
    """Forwards to S3, except that the next requests follow ``plan``: ``slowdown`` (503), ``error``
    (500), ``conflict`` (409 ConditionalRequestConflict), ``applied-then-error`` (forwarded, then 500
    instead of the real answer), ``key-error:CODE:KEY`` (a DeleteObjects forwarded, then answered as
    if KEY had failed with CODE) or ``forward``. ``bodies`` has every request's body."""

    def __init__(self, target: str) -> None:
        self.target = target
        self.plan: list[str] = []
        self.seen: list[tuple[str, str]] = []
        self.bodies: list[bytes] = []
        self._session: aiohttp.ClientSession | None = None
        self._runner: web.AppRunner | None = None
        self.endpoint = ""

    async def start(self) -> None:
        self._session = aiohttp.ClientSession(auto_decompress=False)
        app = web.Application(client_max_size=64 * 1024 * 1024)
        app.router.add_route("*", "/{tail:.*}", self._handle)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        port = free_port()
        await web.TCPSite(self._runner, "127.0.0.1", port).start()
        self.endpoint = f"http://127.0.0.1:{port}"

    async def close(self) -> None:
        assert self._session is not None and self._runner is not None
        await self._session.close()
        await self._runner.cleanup()

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        action = self.plan.pop(0) if self.plan else "forward"
        self.seen.append((request.method, action))
        body = await request.read()
        self.bodies.append(body)
        if action == "slowdown":
            return _s3_error(503, "SlowDown")
        if action == "error":
            return _s3_error(500, "InternalError")
        if action == "conflict":
            return _s3_error(409, "ConditionalRequestConflict")
        assert self._session is not None
        headers = {k: v for k, v in request.headers.items() if k.lower() not in _HOP_HEADERS}
        async with self._session.request(
            request.method, self.target + request.path_qs, headers=headers, data=body
        ) as upstream:
            payload = await upstream.read()
            if action == "applied-then-error":
                return _s3_error(500, "InternalError")
            if action.startswith("key-error:"):
                _, code, key = action.split(":", 2)
                failed = f"<Error><Key>{key}</Key><Code>{code}</Code><Message>{code}</Message></Error>"
                result = f'<?xml version="1.0" encoding="UTF-8"?><DeleteResult>{failed}</DeleteResult>'
                return web.Response(status=200, body=result.encode(), content_type="application/xml")
            out = {k: v for k, v in upstream.headers.items() if k.lower() not in _HOP_HEADERS | {"date", "server"}}
            return web.Response(status=upstream.status, headers=out, body=payload)


@pytest.fixture
async def proxy(s3_server: S3Server) -> AsyncIterator[FaultyProxy]:
    p = FaultyProxy(s3_server.endpoint)
    await p.start()
    yield p
    await p.close()


@pytest.fixture
async def store(s3_server: S3Server, proxy: FaultyProxy) -> AsyncIterator[S3Store]:
    s = S3Store(
        s3_server.create_bucket(), endpoint=proxy.endpoint, region=s3_server.region,
        access_key=s3_server.access_key, secret_key=s3_server.secret_key,
        attempts=4, backoff_base=0.01, backoff_cap=0.05,
    )
    await s.start()
    yield s
    await s.close()


async def test_throttling_and_server_errors_are_retried(store: S3Store, proxy: FaultyProxy) -> None:
    proxy.plan = ["slowdown", "error", "forward"]
    etag = await store.put("k", b"v")
    proxy.plan = ["slowdown"]
    got = await store.get("k")
    assert got is not None and got.data == b"v" and got.etag == etag
    proxy.plan = ["error", "error"]
    assert await store.list("") == ["k"]
    assert store.ops["put.retry"] == 2 and store.ops["get.retry"] == 1 and store.ops["list.retry"] == 2
    assert store.ops["put.error"] == 0


async def test_attempts_are_bounded(store: S3Store, proxy: FaultyProxy) -> None:
    proxy.plan = ["slowdown"] * 4
    with pytest.raises(Unavailable) as info:
        await store.put("k", b"v")
    assert info.value.code == "store_unavailable"
    assert "SlowDown" in info.value.message
    assert store.ops["put.error"] == 1 and store.ops["put.retry"] == 3
    assert await store.get("k") is None


async def test_our_own_lost_reply_is_not_a_lost_race(store: S3Store, proxy: FaultyProxy) -> None:
    # The first attempt is stored but its answer lost; the retry gets 412 and reads the object back.
    proxy.plan = ["applied-then-error"]
    etag = await store.put("segment", b"ours", if_none_match=True)
    got = await store.get("segment")
    assert got is not None and got.etag == etag and got.data == b"ours"
    # Same for if_match.
    proxy.plan = ["applied-then-error"]
    etag2 = await store.put("segment", b"ours, v2", if_match=etag)
    assert (await store.get("segment")).etag == etag2  # type: ignore[union-attr]
    # But a 412 on the first attempt is a lost race, even if the bytes happen to match.
    with pytest.raises(PreconditionFailed):
        await store.put("segment", b"ours, v2", if_none_match=True)


async def test_a_concurrent_conditional_write_conflict_is_a_lost_race(store: S3Store, proxy: FaultyProxy) -> None:
    proxy.plan = ["conflict"]
    with pytest.raises(PreconditionFailed):
        await store.put("k", b"v", if_none_match=True)
    assert [m for m, _ in proxy.seen] == ["PUT"]  # not retried


async def test_listing_pages(store: S3Store) -> None:
    store.page_size = 3  # small pages, to cross page boundaries with a few keys
    keys = [f"m/{i:04d}" for i in range(10)]
    for k in keys:
        await store.put(k, b"x")
    assert await store.list("m/") == keys
    assert await store.list("m/", limit=7) == keys[:7]
    assert await store.list("m/", start_after="m/0002", limit=5) == keys[3:8]


async def test_delete_many_in_batches(store: S3Store) -> None:
    store.delete_batch = 3  # small batches, to cross batch boundaries with a few keys
    keys = [f"wal/{i}" for i in range(7)]
    for k in keys:
        await store.put(k, b"x")
    await store.delete_many([*keys, "wal/missing"])
    assert await store.list("") == []
    assert store.ops["delete"] == 3


async def test_delete_many_retries_only_the_keys_that_failed(store: S3Store, proxy: FaultyProxy) -> None:
    keys = [f"wal/{i}" for i in range(3)]
    for k in keys:
        await store.put(k, b"x")
    proxy.plan = ["slowdown", "key-error:InternalError:wal/1"]
    await store.delete_many(keys)
    assert await store.list("") == []
    assert store.ops["delete.retry"] == 2
    *_, last_delete = (body for body in proxy.bodies if b"<Delete" in body)
    assert b"wal/1" in last_delete and b"wal/0" not in last_delete
    # A key that fails for good makes the call fail.
    await store.put("wal/0", b"x")
    proxy.plan = ["key-error:AccessDenied:wal/0"]
    with pytest.raises(Unavailable) as info:
        await store.delete_many(["wal/0"])
    assert "AccessDenied" in info.value.message
    assert store.ops["delete.error"] == 1


async def test_unreachable_service_is_unavailable() -> None:
    s = S3Store("bucket", endpoint=f"http://127.0.0.1:{free_port()}", access_key="a", secret_key="b",
                attempts=2, backoff_base=0.01)
    await s.start()
    try:
        with pytest.raises(Unavailable) as info:
            await s.get("k")
        assert info.value.code == "store_unavailable"
        assert s.ops["get.retry"] == 1
    finally:
        await s.close()


async def test_missing_bucket_is_unavailable_at_once(s3_server: S3Server) -> None:
    s = S3Store.from_url(s3_server.url("no-such-bucket-here"))
    await s.start()
    try:
        with pytest.raises(Unavailable):
            await s.put("k", b"v")
        assert s.ops["put.retry"] == 0
    finally:
        await s.close()


async def test_prefix_keeps_deployments_apart(s3_server: S3Server) -> None:
    bucket = s3_server.create_bucket()
    one = S3Store.from_url(s3_server.url(bucket).replace(bucket, f"{bucket}/one", 1))
    two = S3Store.from_url(s3_server.url(bucket).replace(bucket, f"{bucket}/two/x", 1))
    whole = S3Store.from_url(s3_server.url(bucket))
    for s in (one, two, whole):
        await s.start()
    try:
        await one.put("a/k", b"1")
        await two.put("a/k", b"2")
        assert (await one.get("a/k")).data == b"1"  # type: ignore[union-attr]
        assert await one.list("") == ["a/k"]
        assert await two.list("a/", start_after="a/") == ["a/k"]
        assert await whole.list("") == ["one/a/k", "two/x/a/k"]
    finally:
        for s in (one, two, whole):
            await s.close()


@pytest.mark.parametrize(
    "url",
    [
        "file://x", "s3://", "s3://Bad_Bucket", "s3://bucket?endpoint=http://x&colour=blue",
        "s3://bucket?access_key=a", "s3://bucket?addressing=sideways", "s3://bucket/../x",
    ],
)
def test_url_is_checked(url: str) -> None:
    with pytest.raises(ValueError):
        S3Store.from_url(url)


def test_secret_is_not_in_the_location() -> None:
    s = S3Store.from_url("s3://bucket?endpoint=http://127.0.0.1:9&access_key=AKIA&secret_key=shh")
    assert "shh" not in s.location and "AKIA" not in s.location
