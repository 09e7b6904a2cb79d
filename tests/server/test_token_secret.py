"""The token-signing secret is not kept in the object store; rotating it logs nobody out."""

from __future__ import annotations

import base64
import logging
import stat
import time
from pathlib import Path
from typing import Any

import jwt
import pytest

from agentchat.config import ConfigError, load_settings
from agentchat.server.app import build_app
from agentchat.server.appkeys import STORE, TOKENS
from agentchat.server.token_secret import SECRET_FILE, load_token_secrets
from agentchat.store import keys as store_keys
from agentchat.store.local import LocalStore
from tests.conftest import RestAgent

OLD = "o" * 40
NEW = "n" * 40


def _settings(tmp_path: Path, **overrides: Any) -> Any:
    return load_settings(env={}, store=f"file://{tmp_path}/data", **overrides)


async def test_one_process_on_the_directory_store_keeps_its_secret_in_a_private_file(
        aiohttp_client: Any, tmp_path: Path) -> None:
    client = await aiohttp_client(build_app(_settings(tmp_path)))
    alice = await RestAgent(client, "alice").register()
    kept = tmp_path / "data" / SECRET_FILE
    assert stat.S_IMODE(kept.stat().st_mode) == 0o600 and len(kept.read_bytes()) >= 32
    assert await client.server.app[STORE].get(store_keys.server_secret()) is None  # not in the store
    await client.close()
    # the next start signs with the same secret: the token still works
    again = await aiohttp_client(build_app(_settings(tmp_path)))
    assert (await again.get("/api/v1/agents/me", headers={"Authorization": f"Bearer {alice.token}"})).status == 200


async def test_health_does_not_read_the_secret(client: Any) -> None:
    store = client.server.app[STORE]
    read: list[str] = []
    get = store.get

    async def recording_get(key: str) -> Any:
        read.append(key)
        return await get(key)

    store.get = recording_get  # type: ignore[method-assign]
    assert (await client.get("/health")).status == 200
    assert read and store_keys.server_secret() not in read


@pytest.mark.parametrize(("bus", "store", "words"), [
    ("redis://127.0.0.1:6379/0", "file", "Redis bus"),
    ("memory://", "s3://bucket?endpoint=http://127.0.0.1:9", "S3 store"),
])
async def test_without_a_setting_where_no_secret_can_be_kept_the_start_says_so(
        tmp_path: Path, bus: str, store: str, words: str) -> None:
    settings = load_settings(env={}, bus=bus, store=f"file://{tmp_path}/data" if store == "file" else store)
    local = LocalStore(tmp_path / "data")
    await local.start()
    try:
        with pytest.raises(ConfigError, match=words) as refused:
            await load_token_secrets(settings, local)
        assert "AGENTCHAT_TOKEN_SECRET" in str(refused.value)
    finally:
        await local.close()


async def test_a_secret_an_earlier_version_kept_in_the_store_is_still_used_with_a_warning(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    local = LocalStore(tmp_path / "data")
    await local.start()
    try:
        await local.put(store_keys.server_secret(), b"\x01" * 32)
        settings = load_settings(env={}, bus="redis://127.0.0.1:6379/0", store=f"file://{tmp_path}/data")
        with caplog.at_level(logging.WARNING):
            assert await load_token_secrets(settings, local) == (b"\x01" * 32, [])
        assert "AGENTCHAT_TOKEN_SECRET=base64:" in caplog.text
        moved = load_settings(env={"AGENTCHAT_TOKEN_SECRET": "base64:" + base64.b64encode(b"\x01" * 32).decode()},
                              store=f"file://{tmp_path}/data")
        assert (await load_token_secrets(moved, local))[0] == b"\x01" * 32  # the same secret, from the setting
    finally:
        await local.close()


async def test_rotation_accepts_the_previous_secret_until_its_tokens_expire(aiohttp_client: Any, tmp_path: Path) -> None:
    before = await aiohttp_client(build_app(_settings(tmp_path, token_secret=OLD)))
    alice = await RestAgent(before, "alice").register()
    await before.close()
    rotated = await aiohttp_client(build_app(_settings(tmp_path, token_secret=NEW, token_secret_previous=OLD)))
    me = {"Authorization": f"Bearer {alice.token}"}
    assert (await rotated.get("/api/v1/agents/me", headers=me)).status == 200  # an old token still works
    new_token, _ = rotated.server.app[TOKENS].issue("agent", alice.did)
    assert jwt.decode(new_token, NEW, algorithms=["HS256"], options={"verify_aud": False})["sub"] == alice.did
    expired = jwt.encode({"iss": "agentchat", "sub": alice.did, "scope": "agent", "iat": int(time.time()) - 100,
                          "exp": int(time.time()) - 10}, OLD, algorithm="HS256")
    answer = await rotated.get("/api/v1/agents/me", headers={"Authorization": f"Bearer {expired}"})
    assert (answer.status, (await answer.json())["error"]["code"]) == (401, "token_expired")
    await rotated.close()
    after = await aiohttp_client(build_app(_settings(tmp_path, token_secret=NEW)))  # rotation over
    answer = await after.get("/api/v1/agents/me", headers=me)
    assert (answer.status, (await answer.json())["error"]["code"]) == (401, "token_invalid")
