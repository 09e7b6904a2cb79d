"""Services hear from the hub through ``HubListener``: their bus topics, new channels, peek reads."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from agentchat.bus import keys as bus_keys
from agentchat.bus.memory import MemoryBus
from agentchat.server.hub import Hub, HubListenerBase
from agentchat.server.metrics import Metrics


class Recorder(HubListenerBase):
    bus_kind = bus_keys.PEEKS

    def __init__(self) -> None:
        self.heard: list[tuple[str, bytes]] = []
        self.created: list[str] = []
        self.got = asyncio.Event()

    def on_bus_message(self, topic: str, body: bytes) -> None:
        self.heard.append((topic, body))
        self.got.set()

    async def on_channel_created(self, channel: str) -> None:
        self.created.append(channel)


def _hub(bus: Any) -> Hub:
    return Hub(bus, None, None, None, metrics=Metrics(), send_queue_max=10)  # type: ignore[arg-type]


async def test_a_listener_hears_its_topics_and_new_channels_until_removed() -> None:
    bus = MemoryBus()
    hub = _hub(bus)
    listener = Recorder()
    hub.add_listener(listener)
    await hub.start()
    try:
        await bus.subscribe(bus_keys.PEEK_STATE)
        await bus.publish(bus_keys.PEEK_STATE, b"one")
        await asyncio.wait_for(listener.got.wait(), 5)
        assert listener.heard == [("state", b"one")]
        await hub.seed_new_channel("ch_1")
        assert listener.created == ["ch_1"]
        hub.remove_listener(listener)
        await bus.publish(bus_keys.PEEK_STATE, b"two")
        await hub.seed_new_channel("ch_2")
        await asyncio.sleep(0.05)
        assert listener.heard == [("state", b"one")] and listener.created == ["ch_1"]
    finally:
        await hub.close()
        await bus.close()


def test_one_reader_per_topic_kind_and_never_the_hubs_own() -> None:
    hub = _hub(MemoryBus())
    hub.add_listener(Recorder())
    with pytest.raises(ValueError):
        hub.add_listener(Recorder())
    mine = Recorder()
    mine.bus_kind = bus_keys.MESSAGES
    with pytest.raises(ValueError):
        hub.add_listener(mine)
    hub.add_listener(HubListenerBase())  # no topics: any number of these
    hub.add_listener(HubListenerBase())
