"""``agentchat backup`` of a running server's store, everything deleted, ``agentchat restore``: the
restored deployment serves the same history, on both stores. A channel that keeps talking while the
backup runs comes back with every message acknowledged before the backup started, and nothing that
was not acknowledged or not whole."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from agentchat import crypto
from agentchat.client import Agent
from agentchat.store import store_from_url
from agentchat.store.transfer import MANIFEST, list_all
from tests.e2e.processes import REPO, ServerProcess
from tests.lifecycle.conftest import StoreUrlMaker

pytestmark = pytest.mark.slow


def agentchat(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "agentchat", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=120)


async def run_agentchat(*args: str) -> subprocess.CompletedProcess[str]:
    return await asyncio.to_thread(agentchat, *args)


async def all_keys(url: str) -> list[str]:
    store = store_from_url(url)
    await store.start()
    try:
        return [key async for key in list_all(store)]
    finally:
        await store.close()


async def delete_everything(url: str) -> None:
    store = store_from_url(url)
    await store.start()
    try:
        await store.delete_many([key async for key in list_all(store)])
    finally:
        await store.close()


def view(messages: list[Any]) -> list[tuple[int, str, str, Any]]:
    return [(m.seq, m.sender, m.client_id, m.content) for m in messages]


async def read_all(agent: Agent, channel: str) -> list[Any]:
    found: list[Any] = []
    while page := await agent.history(channel, after=found[-1].seq if found else 0, limit=100):
        found.extend(page)
    return found


async def test_backup_while_running_then_restore_into_an_empty_store(
        empty_store_url: StoreUrlMaker, tmp_path: Path) -> None:
    store_url = empty_store_url()
    backup_url = (f"file://{tmp_path}/backup" if store_url.startswith("file://") else empty_store_url())
    server = ServerProcess(store=store_url, log_path=tmp_path / "server.log").start()
    alice, bob = Agent(server.url, crypto.AgentKeys.generate()), Agent(server.url, crypto.AgentKeys.generate())
    try:
        await alice.register("alice")
        await bob.register("bob")
        quiet = await alice.create_channel([bob.did], name="quiet")
        busy = await alice.create_channel([bob.did], name="busy")
        for i in range(40):
            await (alice if i % 3 else bob).send(quiet, {"n": i, "text": f"quiet message {i}"})
        acked_busy: dict[int, Any] = {}
        for i in range(20):
            acked_busy[await alice.send(busy, f"busy {i}")] = f"busy {i}"
        quiet_before = view(await read_all(bob, quiet))
        assert len(quiet_before) == 40

        # The busy channel keeps talking while the backup runs.
        acked_before_backup = dict(acked_busy)
        stop = asyncio.Event()

        async def chatter() -> None:
            i = 20
            while not stop.is_set():
                acked_busy[await alice.send(busy, f"busy {i}")] = f"busy {i}"
                i += 1

        talking = asyncio.create_task(chatter())
        await asyncio.sleep(0.2)
        backup = await run_agentchat("backup", backup_url, "--store", store_url)
        stop.set()
        await talking
        assert backup.returncode == 0, backup.stderr
        assert "write-ahead batches:" in backup.stdout and "segments:" in backup.stdout
        assert "backup done:" in backup.stdout
        assert len(acked_busy) > len(acked_before_backup)
        busy_before = view(await read_all(bob, busy))
    finally:
        await alice.close()
        await bob.close()
        server.stop()

    await delete_everything(store_url)
    assert await all_keys(store_url) == []
    assert MANIFEST in await all_keys(backup_url)
    restored = await run_agentchat("restore", backup_url, "--store", store_url)
    assert restored.returncode == 0, restored.stderr
    assert "restore done:" in restored.stdout
    again = await run_agentchat("restore", backup_url, "--store", store_url)
    assert again.returncode == 1 and "not empty" in again.stderr

    server.start()
    alice2, bob2 = Agent(server.url, alice.keys), Agent(server.url, bob.keys)
    try:
        await alice2.login()
        await bob2.login()
        assert view(await read_all(bob2, quiet)) == quiet_before
        busy_after = view(await read_all(bob2, busy))
        after_seqs = {seq for seq, *_ in busy_after}
        assert set(acked_before_backup) <= after_seqs  # everything acked before the backup started
        assert after_seqs <= set(acked_busy)  # nothing that was never acknowledged
        originals = {entry[0]: entry for entry in busy_before}
        assert all(entry == originals[entry[0]] for entry in busy_after)  # each whole and the same
        assert {c["id"] for c in await alice2.channels()} == {quiet, busy}
        # The restored deployment goes on: new numbers after the restored ones.
        seq = await alice2.send(quiet, "after the restore")
        assert seq > quiet_before[-1][0]
    finally:
        await alice2.close()
        await bob2.close()
        server.close()
