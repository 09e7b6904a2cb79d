"""The ``bus`` and ``store`` settings pick an implementation by URL scheme."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from agentchat.bus import bus_from_url
from agentchat.bus.memory import MemoryBus
from agentchat.store import store_from_url
from agentchat.store.local import LocalStore


def test_memory_buses() -> None:
    assert isinstance(bus_from_url("memory://"), MemoryBus)
    assert bus_from_url("memory://")._broker is not bus_from_url("memory://")._broker  # type: ignore[attr-defined]


async def test_named_memory_buses_share_a_broker() -> None:
    a, b = bus_from_url("memory://node-test"), bus_from_url("memory://node-test")
    got: list[tuple[str, int, bytes]] = []
    await a.start(lambda t, s, body: got.append((t, s, body)))
    await b.start(lambda t, s, body: None)
    await a.subscribe("t")
    await b.seed_sequence("c", 0)
    assert await b.publish_sequenced("t", "c", b"x") == 1
    assert got == [("t", 1, b"x")]
    await a.close()
    await b.close()


def test_redis_bus() -> None:
    from agentchat.bus.redis import RedisBus

    assert isinstance(bus_from_url("redis://127.0.0.1:6379/0?namespace=x"), RedisBus)
    assert isinstance(bus_from_url("rediss://127.0.0.1:6380/1"), RedisBus)


@pytest.mark.parametrize("url", ["kafka://x", "memory", "", "memory://a/b", "http://127.0.0.1"])
def test_unknown_bus(url: str) -> None:
    with pytest.raises(ValueError):
        bus_from_url(url)


def test_local_store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    store = store_from_url(f"file://{tmp_path}/data")
    assert isinstance(store, LocalStore) and store.root == tmp_path / "data"
    monkeypatch.chdir(tmp_path)
    relative = store_from_url("file://./data")
    assert isinstance(relative, LocalStore) and relative.root.resolve() == tmp_path / "data"


def test_s3_store() -> None:
    from agentchat.store.s3 import S3Store

    store = store_from_url("s3://bucket/deploy?endpoint=https://acct.r2.cloudflarestorage.com&region=auto")
    assert isinstance(store, S3Store) and store.bucket == "bucket" and store.prefix == "deploy/"


@pytest.mark.parametrize("url", ["gs://bucket", "./data", "", "file://", "file://x?y=1"])
def test_unknown_store(url: str) -> None:
    with pytest.raises(ValueError):
        store_from_url(url)


def test_heavy_clients_are_imported_only_when_used() -> None:
    import subprocess

    code = (
        "import sys; from agentchat.bus import bus_from_url; from agentchat.store import store_from_url; "
        "bus_from_url('memory://'); store_from_url('file://./d'); "
        "print(any(m.split('.')[0] in ('redis', 'aiobotocore', 'botocore') for m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
