"""The hub's seams: services hear from it through ``HubListener``; a sent message's stored frame does
not depend on when the bus delivers it here."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace
from typing import Any

import orjson
import pytest

from agentchat.bus import keys as bus_keys
from agentchat.bus.memory import MemoryBroker, MemoryBus
from agentchat.core import frames
from agentchat.errors import error
from agentchat.server import catch_up as catch_up_module
from agentchat.server.hub import Hub, HubListenerBase, Room
from agentchat.server.metrics import Metrics
from agentchat.server.session import Session
from agentchat.store.messages import frame_seq


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


def test_the_stored_frame_is_the_fanned_out_one_whenever_the_bus_delivered_it() -> None:
    room = Room({"id": "ch_1", "members": ["a"], "epoch": 0, "owner": "a"})
    room.on_message(7, b"frame 7")
    room.on_message(8, b"frame 8")  # a later message delivered before the sender's publish returned
    assert room.frame(7, b"{}") == b"frame 7"
    assert room.frame(9, b'{"x":1}') == frames.message_frame(9, b'{"x":1}')  # not delivered here yet


class _Records:
    async def get_channel(self, channel: str) -> dict[str, Any]:
        return {"id": channel, "members": ["did:a"], "epoch": 1, "owner": "did:a"}


class _LateStore:
    """History whose first read misses a message that is stored just after (another process's batch)."""

    def __init__(self, late: list[bytes]) -> None:
        self.stored: list[bytes] = []
        self.late = late

    async def read(self, channel: str, after: int, limit: int, **_: Any) -> list[bytes]:
        found = [frame for frame in self.stored if frame_seq(frame) > after][:limit]
        self.stored += self.late
        self.late = []
        return found


class _Reader:
    """What ``Hub.attach`` needs of a session; the frames it was given, in order."""

    queue_max = 100
    closed = False
    offer = Session.offer

    def __init__(self) -> None:
        self.principal = SimpleNamespace(is_agent=True, subject="did:a")
        self.cursors: dict[str, Any] = {}
        self.frames: list[bytes] = []

    def push(self, frame: bytes) -> None:
        self.frames.append(frame)

    def backlog(self) -> int:
        return 0

    def close_soon(self, code: int, reason: str) -> None:
        raise AssertionError(f"closed: {reason}")


async def test_a_reader_that_joins_while_another_process_stores_a_message_gets_it_before_later_ones() -> None:
    """Another process numbered message 1 before this process subscribed to the channel and stores
    it a moment after this process's first store read: the reader resuming from 0 gets 1, then 2
    live (before: only 2; the catch-up took the empty store for the end of the channel)."""
    broker = MemoryBroker()
    here, there = MemoryBus(broker), MemoryBus(broker)
    await there.start(lambda topic, seq, body: None)
    channel = "ch_1"
    topic, counter = bus_keys.channel_messages(channel), bus_keys.sequence_counter(channel)
    body = b'{"channel":"ch_1"}'
    await there.seed_sequence(counter, 0)
    assert await there.publish_sequenced(topic, counter, body) == 1  # not stored yet
    history = _LateStore([frames.message_frame(1, body)])
    hub = Hub(here, _Records(), history, None, metrics=Metrics(), send_queue_max=10,  # type: ignore[arg-type]
              gap_fill_wait=0.05)
    await here.start(hub._on_bus)
    reader = _Reader()
    try:
        await hub.attach(reader, channel, resume_after=0)  # type: ignore[arg-type]
        assert await there.publish_sequenced(topic, counter, body) == 2
        for _ in range(10):
            await asyncio.sleep(0)
        assert [frame_seq(frame) for frame in reader.frames] == [1, 2]
    finally:
        await here.close()
        await there.close()


class _AwayStore:
    """History that answers store_unavailable ``failures`` times (a failover), then reads normally."""

    def __init__(self, stored: list[bytes], failures: int) -> None:
        self.stored = stored
        self.failures = failures

    async def read(self, channel: str, after: int, limit: int, **_: Any) -> list[bytes]:
        if self.failures:
            self.failures -= 1
            raise error("store_unavailable", "the store is away")
        return [frame for frame in self.stored if frame_seq(frame) > after][:limit]


class _ClosingReader(_Reader):
    def __init__(self) -> None:
        super().__init__()
        self.closed_with: tuple[int, str] | None = None

    def close_soon(self, code: int, reason: str, *, flush: bool = False) -> None:
        self.closed_with = (code, reason)
        self.closed = True


async def _resume_against(history: Any, reader: _Reader, live: int) -> None:
    bus = MemoryBus(MemoryBroker())
    channel = "ch_1"
    topic, counter = bus_keys.channel_messages(channel), bus_keys.sequence_counter(channel)
    await bus.seed_sequence(counter, len(getattr(history, "stored", [])))
    hub = Hub(bus, _Records(), history, None, metrics=Metrics(), send_queue_max=10)  # type: ignore[arg-type]
    await bus.start(hub._on_bus)
    try:
        attaching = asyncio.create_task(hub.attach(reader, channel, resume_after=0))  # type: ignore[arg-type]
        await asyncio.sleep(0)
        for _ in range(live):  # numbered while the catch-up is stalled: held, then sent in order
            await bus.publish_sequenced(topic, counter, b'{"channel":"ch_1"}')
        await attaching
    finally:
        await bus.close()


async def test_a_catch_up_that_meets_a_store_away_for_a_moment_retries_and_leaves_no_hole() -> None:
    """The store answers store_unavailable twice (a failover) while a reader resumes: the catch-up is
    tried again, and the reader gets the stored messages, then the ones held live, once each, in
    order (before: an error frame, and the held messages were never sent)."""
    stored = [frames.message_frame(seq, b'{"channel":"ch_1"}') for seq in (1, 2, 3)]
    reader = _Reader()
    await _resume_against(_AwayStore(stored, failures=2), reader, live=2)
    assert [frame_seq(frame) for frame in reader.frames] == [1, 2, 3, 4, 5]


async def test_a_catch_up_that_cannot_finish_hands_the_reader_back_to_its_client(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The store stays away past the catch-up's patience: the socket is closed with 1013 (reconnect and
    resume from the last number got) instead of going on live with a hole behind it."""
    monkeypatch.setattr(catch_up_module, "CATCH_UP_PATIENCE", 0.3)
    reader = _ClosingReader()
    stored = [frames.message_frame(1, b'{"channel":"ch_1"}')]
    await _resume_against(_AwayStore(stored, failures=10**6), reader, live=0)
    assert reader.closed_with == (1013, "catch_up_failed")
    errors = [orjson.loads(frame) for frame in reader.frames]
    assert errors and errors[-1]["type"] == "error" and errors[-1]["code"] == "store_unavailable"


class _SlowStore:
    """History whose first ``misses`` reads come before the group commit of message 1 landed."""

    def __init__(self, frame: bytes, misses: int) -> None:
        self.frame = frame
        self.misses = misses

    async def read(self, channel: str, after: int, limit: int, **_: Any) -> list[bytes]:
        if self.misses:
            self.misses -= 1
            return []
        return [self.frame] if after < 1 else []


async def test_a_resume_waits_for_a_number_still_in_flight_on_a_live_process_however_long_its_store_takes() -> None:
    """Another live process numbered message 1 (in flight, not stored) and stores it only after a dozen
    store reads of the catch-up, longer than the fixed wait for other processes' group commits: the
    reader still gets 1 before 2 (before: it gave up after four tries and never got 1)."""
    broker = MemoryBroker()
    here, there = MemoryBus(broker), MemoryBus(broker)
    await there.start(lambda topic, seq, body: None)
    channel = "ch_1"
    topic, counter = bus_keys.channel_messages(channel), bus_keys.sequence_counter(channel)
    body = b'{"channel":"ch_1"}'
    await there.seed_sequence(counter, 0)
    await there.set(bus_keys.heartbeat("there"), b"1", 60)
    await there.index_add([(bus_keys.IN_FLIGHT_PROCESSES, "there", 0)])
    assert await there.claim_and_publish("cid:ch_1:s:1", b"p:there", 60, topic, counter, body,
                                         in_flight=bus_keys.in_flight(channel, "there")) == 1
    history = _SlowStore(frames.message_frame(1, body), misses=12)
    hub = Hub(here, _Records(), history, None, metrics=Metrics(), send_queue_max=10,  # type: ignore[arg-type]
              gap_fill_wait=0.02)
    await here.start(hub._on_bus)
    reader = _Reader()
    try:
        attaching = asyncio.create_task(hub.attach(reader, channel, resume_after=0))  # type: ignore[arg-type]
        await asyncio.sleep(0)
        assert await there.publish_sequenced(topic, counter, body) == 2
        await asyncio.wait_for(attaching, 10)
        assert [frame_seq(frame) for frame in reader.frames] == [1, 2]
    finally:
        await here.close()
        await there.close()


async def test_a_member_whose_process_hears_of_its_join_late_still_gets_what_was_sent_since() -> None:
    """bob accepts an invitation through one process; alice's message 1 is numbered before bob's
    process hears of the join (another bus topic, another task): bob's socket still gets it, after
    the ``added`` frame (before: live delivery started when the process heard, and 1 was lost)."""
    bus = MemoryBus(MemoryBroker())
    channel = "ch_1"
    topic, counter = bus_keys.channel_messages(channel), bus_keys.sequence_counter(channel)
    await bus.seed_sequence(counter, 0)
    stored: list[bytes] = []
    hub = Hub(bus, _Records(), _AwayStore(stored, failures=0), None, metrics=Metrics(),  # type: ignore[arg-type]
              send_queue_max=10)
    await bus.start(hub._on_bus)
    published: list[dict[str, Any]] = []
    real_publish = hub.publish_agent_event

    async def hold(did: str, event: dict[str, Any]) -> None:
        published.append(event)  # not delivered yet: bob's process hears of it below
    hub.publish_agent_event = hold  # type: ignore[method-assign]
    reader = _Reader()
    try:
        await hub.register_session(reader)  # type: ignore[arg-type]
        await hub.announce_joined("did:a", channel)
        body = b'{"channel":"ch_1"}'
        await bus.publish_sequenced(topic, counter, body)
        stored.append(frames.message_frame(1, body))
        hub.publish_agent_event = real_publish  # type: ignore[method-assign]
        await hub._on_agent_event("did:a", published[0])
        got = [orjson.loads(frame) for frame in reader.frames]
        assert [(f["type"], f.get("event"), f.get("seq")) for f in got] == [("channel", "added", None),
                                                                           ("message", None, 1)]
    finally:
        await bus.close()


async def test_a_resume_settles_a_number_a_dead_process_left_in_flight_and_gets_its_gap() -> None:
    """Process "gone" numbered 1 and died before storing it (no heartbeat): the catch-up recovers that
    process itself, which declares 1 a gap, and the reader gets the gap before 2, without waiting."""
    broker = MemoryBroker()
    here, gone = MemoryBus(broker), MemoryBus(broker)
    channel = "ch_1"
    topic, counter = bus_keys.channel_messages(channel), bus_keys.sequence_counter(channel)
    body = b'{"channel":"ch_1"}'
    await gone.seed_sequence(counter, 0)
    await gone.index_add([(bus_keys.IN_FLIGHT_PROCESSES, "gone", 0)])
    assert await gone.claim_and_publish("cid:ch_1:s:1", b"p:gone", 60, topic, counter, body,
                                        in_flight=bus_keys.in_flight(channel, "gone")) == 1
    stored: list[bytes] = []
    recovered: list[str] = []

    async def recover_instance(instance: str, *, dead: bool) -> None:
        assert dead
        recovered.append(instance)
        stored.append(frames.gap_frame(channel, 1, 5))  # what WriteAheadRecovery stores
        await gone.index_remove([(bus_keys.in_flight(channel, "gone"), "1")])

    writer = SimpleNamespace(recovery=SimpleNamespace(recover_instance=recover_instance))
    hub = Hub(here, _Records(), _AwayStore(stored, failures=0), writer, metrics=Metrics(),  # type: ignore[arg-type]
              send_queue_max=10, gap_fill_wait=0.02)
    await here.start(hub._on_bus)
    reader = _Reader()
    try:
        attaching = asyncio.create_task(hub.attach(reader, channel, resume_after=0))  # type: ignore[arg-type]
        await asyncio.sleep(0)
        assert await here.publish_sequenced(topic, counter, body) == 2
        await asyncio.wait_for(attaching, 10)
        assert recovered == ["gone"]
        assert [(frames.is_gap(frame), frame_seq(frame)) for frame in reader.frames] == [(True, 1), (False, 2)]
    finally:
        await here.close()
