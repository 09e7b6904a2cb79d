"""What a message costs while it waits for group commit: the objects it keeps alive, and its ack."""

from __future__ import annotations

import asyncio
import gc
from pathlib import Path
from typing import Any

from agentchat.config import load_settings
from agentchat.server.app import build_app
from agentchat.server.appkeys import HUB, METRICS
from tests.conftest import RestAgent
from tests.server.test_rest import create_channel, envelope


class Acks:
    """One ack target shared by every send, as a socket's session is."""

    def __init__(self) -> None:
        self.seqs: list[int] = []
        self.notes: list[bytes] = []

    def acked(self, note: bytes, seq: int) -> None:
        self.notes.append(note)
        self.seqs.append(seq)


def tracked_objects() -> int:
    gc.collect()  # also untracks the tuples and dicts that hold only atomic values
    return len(gc.get_objects())


async def test_a_message_waiting_for_storage_keeps_about_one_object_alive(aiohttp_client, tmp_path: Path,
                                                                          monkeypatch: Any) -> None:
    # Every object a waiting message keeps alive is visited by each young garbage collection while
    # the event loop waits; a closure per message (a function, its cells, a record) made those pauses
    # several milliseconds long under fan-out.
    settings = load_settings(env={}, store=f"file://{tmp_path}/data", token_secret="t" * 40)
    client = await aiohttp_client(build_app(settings))
    alice = await RestAgent(client, "alice").register()
    channel, key = await create_channel(alice, [])
    hub = client.server.app[HUB]
    writer = hub.writer
    release = asyncio.Event()
    put = writer.store.put

    async def held_put(*args: Any, **kwargs: Any) -> Any:
        await release.wait()
        return await put(*args, **kwargs)

    monkeypatch.setattr(writer.store, "put", held_put)
    acks = Acks()
    await hub.send(alice.did, channel, "m0", envelope(alice, channel, key, "first", "m0"), acks, b"n0")
    for _ in range(100):
        if writer._in_flight:
            break
        await asyncio.sleep(0.01)
    assert writer._in_flight == 1  # its batch is being written; what follows waits in the queue

    count = 300
    sealed = [envelope(alice, channel, key, f"text {i}", f"m{i}") for i in range(1, count + 1)]
    before = tracked_objects()
    for i, sealed_envelope in enumerate(sealed, 1):
        await hub.send(alice.did, channel, f"m{i}", sealed_envelope, acks, b"n%d" % i)
    sealed.clear()
    grown = tracked_objects() - before
    assert writer.pending == count + 1
    assert grown <= 1.5 * count, f"{grown / count:.1f} tracked objects per waiting message"

    release.set()
    for _ in range(500):
        if len(acks.seqs) == count + 1:
            break
        await asyncio.sleep(0.01)
    assert acks.seqs == list(range(1, count + 2))  # every message acked once, in number order
    assert acks.notes == [b"n%d" % i for i in range(count + 1)]  # each with its sender's note


async def test_sends_after_the_bus_forgot_the_counter_share_one_reseed(aiohttp_client, tmp_path: Path) -> None:
    # A Redis restart under load: every send finds the channel's counter gone. One re-seed (reading
    # the store once) serves them all, and their claims still hold a number each.
    settings = load_settings(env={}, store=f"file://{tmp_path}/data", token_secret="t" * 40)
    client = await aiohttp_client(build_app(settings))
    alice = await RestAgent(client, "alice").register()
    channel, key = await create_channel(alice, [])
    hub = client.server.app[HUB]
    acks = Acks()
    for i in range(5):
        await hub.send(alice.did, channel, f"s{i}", envelope(alice, channel, key, "before", f"s{i}"), acks)
    hub.bus._broker.counters.clear()  # what a restart without persistence does to the counters
    store_ops = client.server.app[METRICS].store_ops
    before = sum(store_ops.values())
    sealed = [envelope(alice, channel, key, f"after {i}", f"a{i}") for i in range(40)]
    await asyncio.gather(*(hub.send(alice.did, channel, f"a{i}", sealed[i], acks) for i in range(40)))
    reads = sum(store_ops.values()) - before
    assert reads <= 10, f"{reads} storage operations for 40 sends after the counter was lost"
    assert hub.sequencer.reseeds == 1
    for _ in range(500):
        if len(acks.seqs) == 45:
            break
        await asyncio.sleep(0.01)
    assert len(set(acks.seqs)) == 45 and min(acks.seqs[5:]) > max(acks.seqs[:5])
