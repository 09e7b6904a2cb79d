"""The ``ObjectStore`` contract (``agentchat/store/base.py``), run against every implementation.

Two stores on one backend (one directory, one bucket) stand for two server processes.
"""

from __future__ import annotations

import asyncio
import os
import random

import pytest

from agentchat.store import base as store_base
from agentchat.store.base import ObjectStore, PreconditionFailed, list_all, pages
from tests.contract.conftest import StartedStoreMaker


async def test_missing_object(store: ObjectStore) -> None:
    assert await store.get("agents/nobody") is None


async def test_put_get_and_etag(store: ObjectStore) -> None:
    etag = await store.put("agents/a1", b"v1")
    got = await store.get("agents/a1")
    assert got is not None and got.data == b"v1" and got.etag == etag
    etag2 = await store.put("agents/a1", b"v2")
    assert etag2 != etag
    got = await store.get("agents/a1")
    assert got is not None and got.data == b"v2" and got.etag == etag2


@pytest.mark.parametrize("data", [b"", bytes(range(256)) * 4, os.urandom(1 << 20)], ids=["empty", "all-bytes", "1MiB"])
async def test_binary_round_trip(store: ObjectStore, data: bytes) -> None:
    await store.put("blobs/x", data)
    got = await store.get("blobs/x")
    assert got is not None and got.data == data


async def test_writes_are_visible_to_another_process(make_store: StartedStoreMaker) -> None:
    a, b = await make_store(), await make_store()
    etag = await a.put("k", b"from a")
    got = await b.get("k")
    assert got is not None and got.data == b"from a" and got.etag == etag


async def test_key_and_longer_key_coexist(store: ObjectStore) -> None:
    await store.put("channels/c1", b"meta")
    await store.put("channels/c1/keys/3", b"wrapped")
    await store.put("channels/c1.archive", b"old")
    assert (await store.get("channels/c1")).data == b"meta"  # type: ignore[union-attr]
    assert (await store.get("channels/c1/keys/3")).data == b"wrapped"  # type: ignore[union-attr]
    assert await store.list("channels/") == ["channels/c1", "channels/c1.archive", "channels/c1/keys/3"]
    await store.delete("channels/c1")
    assert await store.list("channels/") == ["channels/c1.archive", "channels/c1/keys/3"]


# -- conditional writes -------------------------------------------------------------------------


async def test_if_none_match(store: ObjectStore) -> None:
    etag = await store.put("peeks/p1", b"first", if_none_match=True)
    with pytest.raises(PreconditionFailed):
        await store.put("peeks/p1", b"second", if_none_match=True)
    got = await store.get("peeks/p1")
    assert got is not None and got.data == b"first" and got.etag == etag


async def test_if_none_match_race_has_one_winner(make_store: StartedStoreMaker) -> None:
    stores = [await make_store(), await make_store()]
    writers = 20

    async def write(i: int) -> tuple[int, str | None]:
        try:
            return i, await stores[i % 2].put("segments/race", f"writer-{i}".encode(), if_none_match=True)
        except PreconditionFailed:
            return i, None

    results = await asyncio.gather(*(write(i) for i in range(writers)))
    winners = [(i, etag) for i, etag in results if etag is not None]
    assert len(winners) == 1
    got = await stores[0].get("segments/race")
    assert got is not None and got.data == f"writer-{winners[0][0]}".encode() and got.etag == winners[0][1]


async def test_if_match(store: ObjectStore) -> None:
    etag1 = await store.put("ledger/l", b"v1")
    etag2 = await store.put("ledger/l", b"v2", if_match=etag1)
    with pytest.raises(PreconditionFailed):
        await store.put("ledger/l", b"stale", if_match=etag1)
    got = await store.get("ledger/l")
    assert got is not None and got.data == b"v2" and got.etag == etag2
    with pytest.raises(PreconditionFailed):
        await store.put("ledger/missing", b"x", if_match=etag2)
    assert await store.get("ledger/missing") is None


async def test_if_match_race_has_one_winner(make_store: StartedStoreMaker) -> None:
    stores = [await make_store(), await make_store()]
    etag = await stores[0].put("ledger/race", b"v0")

    async def write(i: int) -> bool:
        try:
            await stores[i % 2].put("ledger/race", f"v{i + 1}".encode(), if_match=etag)
            return True
        except PreconditionFailed:
            return False

    results = await asyncio.gather(*(write(i) for i in range(20)))
    assert results.count(True) == 1
    got = await stores[1].get("ledger/race")
    assert got is not None and got.data == f"v{results.index(True) + 1}".encode()


async def test_if_match_increments_lose_no_update(make_store: StartedStoreMaker) -> None:
    stores = [await make_store(), await make_store()]
    await stores[0].put("counter", b"0")

    async def increment(store: ObjectStore) -> None:
        while True:
            current = await store.get("counter")
            assert current is not None
            try:
                await store.put("counter", str(int(current.data) + 1).encode(), if_match=current.etag)
                return
            except PreconditionFailed:
                await asyncio.sleep(random.random() / 1000)

    await asyncio.gather(*(increment(stores[i % 2]) for i in range(8)))
    got = await stores[0].get("counter")
    assert got is not None and got.data == b"8"


# -- listing ------------------------------------------------------------------------------------

KEYS = [
    "a", "a-b", "a.b", "a/b", "a/b/c", "a0", "a:x", "a@y", "a=z", "b",
    "messages/ch1/00000000000000000001", "messages/ch1/00000000000000000100",
    "messages/ch1/00000000000000001000", "messages/ch10/00000000000000000001",
    "messages/ch2/00000000000000000001", "Z", "_u", "z+1",
]


@pytest.fixture
async def listed(store: ObjectStore) -> list[str]:
    keys = KEYS[:]
    random.Random(7).shuffle(keys)
    await asyncio.gather(*(store.put(k, k.encode()) for k in keys))
    return sorted(KEYS)


async def test_list_is_in_byte_order(store: ObjectStore, listed: list[str]) -> None:
    assert await store.list("") == listed
    assert listed == sorted(listed, key=str.encode)


PREFIXES = [
    "a", "a/", "a/b", "messages/", "messages/ch1", "messages/ch1/", "messages/ch1/0000",
    "messages/ch1/00000000000000000001", "nothing", "messages/ch3/",
]
START_AFTERS = [
    "", "a", "a/", "a/b", "a/b/c", "a0", "messages/ch1/", "messages/ch1/00000000000000000100", "zz", "0",
]


async def test_list_prefix(store: ObjectStore, listed: list[str]) -> None:
    for prefix in PREFIXES:  # one store for every case: writing the keys is the slow part
        assert await store.list(prefix) == [k for k in listed if k.startswith(prefix)], prefix


async def test_list_start_after(store: ObjectStore, listed: list[str]) -> None:
    for start_after in START_AFTERS:
        assert await store.list("", start_after=start_after) == [k for k in listed if k > start_after], start_after
        assert await store.list("messages/", start_after=start_after) == [
            k for k in listed if k.startswith("messages/") and k > start_after
        ], start_after


async def test_list_limit_and_paging(store: ObjectStore, listed: list[str]) -> None:
    assert await store.list("", limit=1) == listed[:1]
    assert await store.list("", limit=5) == listed[:5]
    assert await store.list("messages/ch1/", start_after="messages/ch1/00000000000000000001", limit=1) == [
        "messages/ch1/00000000000000000100"
    ]
    paged: list[str] = []
    while page := await store.list("", start_after=paged[-1] if paged else "", limit=4):
        paged += page
    assert paged == listed


async def test_list_all_and_pages_read_every_page(store: ObjectStore, listed: list[str],
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(store_base, "LIST_PAGE", 4)  # several pages out of a few keys
    assert await list_all(store, "") == listed
    assert await list_all(store, "", limit=6) == listed[:6]
    assert await list_all(store, "messages/", start_after="messages/ch1/00000000000000000100") == [
        k for k in listed if k.startswith("messages/") and k > "messages/ch1/00000000000000000100"]
    assert [page async for page in pages(store, "", limit=9)] == [listed[:4], listed[4:8], listed[8:9]]
    assert await list_all(store, "nothing") == []


async def test_list_after_delete(store: ObjectStore, listed: list[str]) -> None:
    await store.delete("a/b/c")
    await store.delete("messages/ch2/00000000000000000001")
    expected = [k for k in listed if k not in ("a/b/c", "messages/ch2/00000000000000000001")]
    assert await store.list("") == expected


# -- delete -------------------------------------------------------------------------------------


async def test_delete_is_idempotent(store: ObjectStore) -> None:
    await store.put("tmp/x", b"1")
    await store.put("tmp/y", b"2")
    await store.delete("tmp/x")
    await store.delete("tmp/x")
    await store.delete("never/existed")
    assert await store.get("tmp/x") is None
    assert (await store.get("tmp/y")).data == b"2"  # type: ignore[union-attr]
    assert await store.list("tmp/") == ["tmp/y"]
    await store.put("tmp/x", b"3", if_none_match=True)  # a deleted key is absent again


async def test_delete_many_removes_present_and_ignores_missing_keys(make_store: StartedStoreMaker) -> None:
    a, b = await make_store(), await make_store()
    for key in ("wal/a/1", "wal/a/2", "wal/b/1", "keep/1"):
        await a.put(key, b"x")
    await b.delete_many(["wal/a/1", "never/existed", "wal/a/2", "wal/b/1", "wal/a/1"])
    assert await a.list("") == ["keep/1"]
    await b.delete_many([])  # nothing to do is fine
    await b.delete_many(["wal/a/1"])  # all missing is fine
    assert await a.list("") == ["keep/1"]
    await a.put("wal/a/1", b"again", if_none_match=True)  # a deleted key is absent again


async def test_delete_many_checks_every_key_first(store: ObjectStore) -> None:
    await store.put("k/1", b"x")
    with pytest.raises(ValueError):
        await store.delete_many(["k/1", "a//b"])
    assert await store.list("") == ["k/1"]


# -- keys ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "key", ["", "/abs", "a//b", "a/", "../x", "a/../b", "a/./b", "a b", "a,b", "a\\b", "é", "a\n", "x" * 1025]
)
async def test_invalid_keys_are_refused(store: ObjectStore, key: str) -> None:
    with pytest.raises(ValueError):
        await store.put(key, b"x")
    with pytest.raises(ValueError):
        await store.get(key)
    with pytest.raises(ValueError):
        await store.delete(key)
    with pytest.raises(ValueError):
        await store.delete_many([key])


async def test_valid_key_characters(store: ObjectStore) -> None:
    key = "agents/did:agentchat:z6Mk+abc=_x-y.z@1/..a/.b"
    await store.put(key, b"ok")
    assert (await store.get(key)).data == b"ok"  # type: ignore[union-attr]
    assert await store.list("agents/") == [key]
