"""Stores holding the checked-in data of an earlier release, on both backends, and servers on them."""

from __future__ import annotations

import json
import shutil
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest

from agentchat import crypto
from agentchat.store import store_from_url
from agentchat.store.local import LocalStore
from agentchat.store.transfer import copy_store
from tests.services import S3Server, s3_server  # noqa: F401

DATA = Path(__file__).resolve().parents[1] / "data"
STORE_KINDS = ["local", "s3"]


def expected(name: str) -> dict[str, Any]:
    return json.loads((DATA / f"{name}.json").read_text())


def agent_keys(name: str, agent: str, tmp_path: Path) -> crypto.AgentKeys:
    """A test agent of store ``name``, loaded from a 0600 key file written from the checked-in
    identities (the repository keeps no key files)."""
    identities = json.loads((DATA / f"{name}-identities.json").read_text())
    key_file = tmp_path / f"{agent}.key"
    key_file.write_text(json.dumps(identities["agents"][agent]))
    key_file.chmod(0o600)
    return crypto.AgentKeys.load(key_file)


StoreUrlMaker = Callable[[], str]


@pytest.fixture(params=STORE_KINDS)
def empty_store_url(request: pytest.FixtureRequest, tmp_path: Path) -> StoreUrlMaker:
    """Makes the URL of a new, empty store on the test's backend (a directory, or a bucket)."""
    counter = iter(range(1000))
    if request.param == "local":
        return lambda: f"file://{tmp_path}/store{next(counter)}"
    server: S3Server = request.getfixturevalue("s3_server")
    return lambda: server.url(server.create_bucket())


async def load_into(url: str, name: str) -> None:
    """Put the objects of ``tests/data/<name>/`` into the (empty) store at ``url``."""
    source, dest = LocalStore(DATA / name), store_from_url(url)
    await source.start()
    await dest.start()
    try:
        await copy_store(source, dest)
    finally:
        await source.close()
        await dest.close()


@pytest.fixture
async def old_store(empty_store_url: StoreUrlMaker, tmp_path: Path) -> AsyncIterator[str]:
    """A store holding ``tests/data/store-v1`` (copied: the checked-in files stay untouched)."""
    if empty_store_url().startswith("file://"):
        root = tmp_path / "old-store"
        shutil.copytree(DATA / "store-v1", root)
        yield f"file://{root}"
    else:
        url = empty_store_url()
        await load_into(url, "store-v1")
        yield url
