"""The message store (``agentchat/store/messages.py``): write-ahead batches, compaction into segments,
reads from any process, recovery of a dead process's batches. Run on the in-process bus with the
directory store, and on Redis with S3 (moto), the two ways the product is deployed.
"""

from __future__ import annotations

import asyncio
import uuid
from typing import Any
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AsyncExitStack
from dataclasses import dataclass
from pathlib import Path

import orjson
import pytest

from agentchat.bus import keys as bus_keys
from agentchat.bus.base import Bus
from agentchat.core import frames
from agentchat.store import keys
from agentchat.store.base import ObjectStore
from agentchat.store.instrumented import CountingStore
from agentchat.bus.keys import wal_index
from agentchat.store.messages import MessageLog, MessageWriter, decode_wal, encode_wal, frame_seq


def message(channel: str, seq: int, text: str = "") -> bytes:
    body = frames.message_body(channel, "did:agentchat:zSender", f"c{seq}", 1_700_000_000_000 + seq,
                               {"epoch": 1, "nonce": "AAAAAAAAAAAAAAAA", "ciphertext": text or f"m{seq}"})
    return frames.message_frame(seq, body)


@dataclass
class Process:
    """One server process's message store: its writer and reader over a shared bus and store."""

    instance: str
    bus: Bus
    store: ObjectStore
    ops: Counter[str]
    writer: MessageWriter
    log: MessageLog

    async def store_messages(self, channel: str, seqs: list[int]) -> None:
        """Queue messages and wait until every one is durable (acked)."""
        acked: list[int] = []
        done = asyncio.Event()

        def on_durable(stored: int, note: Any) -> None:
            assert note == f"note {stored}"  # each message's note comes back with it
            acked.append(stored)
            if len(acked) == len(seqs):
                done.set()
        for seq in seqs:
            self.writer.add(channel, seq, message(channel, seq), on_durable, f"note {seq}")
        await asyncio.wait_for(done.wait(), 10)
        assert sorted(acked) == sorted(seqs)

    def kill(self) -> None:
        """Stop writing without compacting, as a process killed with -9 would."""
        for task in [*self.writer._tasks, *([self.writer._flusher] if self.writer._flusher else [])]:
            task.cancel()


ProcessMaker = Callable[..., Awaitable[Process]]


@pytest.fixture(params=["memory-local", "redis-s3"])
async def make_process(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[ProcessMaker]:
    """``await make_process(alive=...)``: one more process on a shared backend; ``alive`` tells which
    instances the recovery must treat as running."""
    async with AsyncExitStack() as stack:
        if request.param == "memory-local":
            from agentchat.bus.memory import MemoryBroker, MemoryBus
            from agentchat.store.local import LocalStore

            broker = MemoryBroker()
            new_bus: Callable[[], Bus] = lambda: MemoryBus(broker)  # noqa: E731
            new_store: Callable[[], ObjectStore] = lambda: LocalStore(tmp_path / "store")  # noqa: E731
        else:
            from agentchat.bus.redis import RedisBus
            from agentchat.store.s3 import S3Store

            redis = request.getfixturevalue("redis_server")
            s3 = request.getfixturevalue("s3_server")
            redis_url = f"{redis.url}?namespace=m{uuid.uuid4().hex[:12]}"
            s3_url = s3.url(s3.create_bucket())
            new_bus = lambda: RedisBus(redis_url)  # noqa: E731
            new_store = lambda: S3Store.from_url(s3_url)  # noqa: E731

        async def make(alive: Callable[[str], bool] = lambda instance: True, max_wait: float = 0.05,
                       segment_messages: int = 4000, start: bool = True) -> Process:
            ops: Counter[str] = Counter()
            store = CountingStore(new_store(), ops, Counter())
            await store.start()
            stack.push_async_callback(store.close)
            bus = new_bus()
            await bus.start(lambda topic, seq, body: None)
            stack.push_async_callback(bus.close)
            instance = uuid.uuid4().hex[:16]
            writer = MessageWriter(store, bus, instance=instance, max_wait=max_wait, max_messages=2000,
                                   pending_max=50_000, segment_messages=segment_messages)

            async def is_alive(other: str) -> bool:
                return alive(other)

            if start:
                await writer.start(is_alive)
                stack.push_async_callback(writer.close)
            return Process(instance, bus, store, ops, writer, MessageLog(store, bus, writer))

        yield make


async def reader(make_process: ProcessMaker) -> MessageLog:
    """A process with no writer of its own (it only serves reads)."""
    other = await make_process()
    return MessageLog(other.store, other.bus)


def seqs(found: list[bytes]) -> list[int]:
    return [frame_seq(frame) for frame in found]


def test_wal_object_round_trip() -> None:
    sections = {"ch_a": [message("ch_a", 1), message("ch_a", 2)], "ch_b": [message("ch_b", 7)]}
    assert decode_wal(encode_wal(sections)) == sections
    assert decode_wal(b"") == {}


async def test_one_write_per_flush_whatever_the_number_of_channels(make_process: ProcessMaker) -> None:
    proc = await make_process(max_wait=0.2)
    before = proc.ops["put"]
    acked: list[int] = []
    for seq in range(1, 1001):
        proc.writer.add(f"ch_{seq % 20}", seq, message(f"ch_{seq % 20}", seq), lambda seq, _: acked.append(seq))
    while len(acked) < 1000:
        await asyncio.sleep(0.01)
    # 1,000 messages in 20 channels, queued at once: one write-ahead object.
    assert proc.ops["put"] - before == 1
    assert proc.writer.stats.wal_objects_written == 1
    listed = await proc.store.list(keys.WAL_PREFIX)
    assert listed == [keys.wal(proc.instance, 1)]
    # Compacting writes one segment per channel and deletes the write-ahead object in one request.
    before = Counter(proc.ops)
    await proc.writer.compact([f"ch_{i}" for i in range(20)])
    assert proc.ops["put"] - before["put"] == 20
    assert proc.ops["delete"] - before["delete"] == 1
    assert await proc.store.list(keys.WAL_PREFIX) == []
    assert await proc.bus.index_range(wal_index("ch_3"), 0) == []
    assert seqs(await proc.log.read("ch_3", 0, 1000)) == list(range(3, 1001, 20))


async def test_a_lone_message_is_written_at_once(make_process: ProcessMaker) -> None:
    # With no load the batch does not wait for company, even with a long max_wait.
    proc = await make_process(max_wait=30.0)
    await proc.store_messages("ch_lone", [1])  # would time out (10 s) if it waited max_wait
    await proc.store_messages("ch_lone", [2])


async def test_reads_see_the_tail_before_and_after_compaction(make_process: ProcessMaker) -> None:
    writer_proc = await make_process()
    other = await reader(make_process)
    await writer_proc.store_messages("ch_x", [1, 2, 3])
    await writer_proc.store_messages("ch_x", [4, 5])
    for log in (writer_proc.log, other):  # its own tail from memory; another process from the store
        assert seqs(await log.read("ch_x", 0, 100)) == [1, 2, 3, 4, 5]
        assert seqs(await log.read("ch_x", 2, 2)) == [3, 4]
        assert await log.last_seq("ch_x") == 5
    await writer_proc.writer.compact(["ch_x"])
    await writer_proc.store_messages("ch_x", [6])
    for log in (writer_proc.log, other):
        assert seqs(await log.read("ch_x", 0, 100)) == [1, 2, 3, 4, 5, 6]
        assert seqs(await log.read("ch_x", 4, 100)) == [5, 6]
        assert await log.last_seq("ch_x") == 6
    assert [keys.parse_segment(k) for k in await writer_proc.store.list(keys.segment_prefix("ch_x"))] == [(1, 5)]


async def test_messages_queued_out_of_order_are_stored_in_number_order(make_process: ProcessMaker) -> None:
    # Two publishes racing on the bus can come back in either order; a batch is kept by number.
    proc = await make_process(max_wait=0.2)
    other = await reader(make_process)
    await proc.store_messages("ch_o", [3, 1, 2, 5, 4])
    assert [seq for seq, _ in proc.writer.tail("ch_o")] == [1, 2, 3, 4, 5]
    for log in (proc.log, other):
        assert seqs(await log.read("ch_o", 0, 100)) == [1, 2, 3, 4, 5]
        assert seqs(await log.read("ch_o", 2, 2)) == [3, 4]
    await proc.writer.compact(["ch_o"])
    assert seqs(await other.read("ch_o", 0, 100)) == [1, 2, 3, 4, 5]


async def test_two_writers_interleave_in_number(make_process: ProcessMaker) -> None:
    a, b = await make_process(), await make_process()
    other = await reader(make_process)
    await a.store_messages("ch_i", [1, 3, 5])
    await b.store_messages("ch_i", [2, 4, 6])
    await a.writer.compact(["ch_i"])  # a's numbers in a segment, b's still in its write-ahead objects
    for log in (a.log, b.log, other):
        assert seqs(await log.read("ch_i", 0, 100)) == [1, 2, 3, 4, 5, 6]
        assert seqs(await log.read("ch_i", 1, 3)) == [2, 3, 4]
    await b.writer.compact(["ch_i"])
    await a.store_messages("ch_i", [7])
    for log in (a.log, b.log, other):
        assert seqs(await log.read("ch_i", 0, 100)) == [1, 2, 3, 4, 5, 6, 7]


async def test_large_tails_become_segments_by_themselves(make_process: ProcessMaker) -> None:
    proc = await make_process(segment_messages=100)
    await proc.store_messages("ch_big", list(range(1, 251)))
    for _ in range(500):  # the compactor runs in the background
        if not proc.writer.tail("ch_big") or len(proc.writer.tail("ch_big")) < 100:
            break
        await asyncio.sleep(0.01)
    assert len(proc.writer.tail("ch_big")) < 100
    assert await proc.store.list(keys.segment_prefix("ch_big"))
    assert seqs(await proc.log.read("ch_big", 0, 1000)) == list(range(1, 251))
    assert seqs(await proc.log.read("ch_big", 120, 10)) == list(range(121, 131))


async def test_paced_compaction_writes_one_segment_at_a_time_with_a_pause_per_byte(
        make_process: ProcessMaker, monkeypatch: pytest.MonkeyPatch) -> None:
    proc = await make_process()  # tails this small are left alone by the background compactor
    channels = [f"ch_pace{i}" for i in range(4)]
    for channel in channels:
        await proc.store_messages(channel, list(range(1, 51)))
    writing, most_at_once, pauses = 0, 0, []
    put = proc.store.put

    async def counting_put(key: str, data: bytes, **kwargs: object) -> str:
        nonlocal writing, most_at_once
        writing += 1
        most_at_once = max(most_at_once, writing)
        try:
            return await put(key, data, **kwargs)
        finally:
            writing -= 1

    real_sleep = asyncio.sleep

    async def recording_sleep(seconds: float, *args: object) -> object:
        pauses.append(seconds)
        return await real_sleep(0)

    monkeypatch.setattr(proc.store, "put", counting_put)
    monkeypatch.setattr("agentchat.store.messages.asyncio.sleep", recording_sleep)
    await proc.writer.compact(channels, pace_bytes_per_second=1000.0)
    monkeypatch.undo()
    assert most_at_once == 1  # one segment at a time
    sizes = [len(b"\n".join(message(c, seq) for seq in range(1, 51))) for c in channels]
    assert pauses == [size / 1000.0 for size in sizes]  # each segment's bytes at the pace
    for channel in channels:
        assert seqs(await proc.log.read(channel, 0, 100)) == list(range(1, 51))
        assert len(await proc.store.list(keys.segment_prefix(channel))) == 1


async def test_a_dead_process_is_recovered_into_segments_without_duplicates(make_process: ProcessMaker) -> None:
    dead = await make_process()
    await dead.store_messages("ch_done", [1, 2])
    await dead.store_messages("ch_open", [1, 2])
    await dead.writer.compact(["ch_done"])   # one channel compacted before the crash, one not
    await dead.store_messages("ch_done", [3])
    dead.kill()
    assert await dead.store.list(keys.WAL_PREFIX)

    survivor = await make_process(alive=lambda instance: instance != dead.instance)
    assert await survivor.store.list(keys.WAL_PREFIX) == []  # recovered at start
    assert await survivor.bus.index_range(wal_index("ch_open"), 0) == []
    for channel, expected in (("ch_done", [1, 2, 3]), ("ch_open", [1, 2])):
        assert seqs(await survivor.log.read(channel, 0, 100)) == expected
        stored: list[int] = []
        for key in await survivor.store.list(keys.segment_prefix(channel)):
            obj = await survivor.store.get(key)
            assert obj is not None
            stored += [frame_seq(line) for line in obj.data.split(b"\n") if line]
        assert sorted(stored) == expected  # each number stored exactly once


async def test_a_dead_process_is_readable_before_it_is_recovered(make_process: ProcessMaker) -> None:
    dead = await make_process()
    await dead.store_messages("ch_d", [1, 2, 3])
    dead.kill()
    other = await reader(make_process)  # believes every process alive: recovers nothing
    assert seqs(await other.read("ch_d", 0, 100)) == [1, 2, 3]


async def test_reindex_after_the_bus_forgot(make_process: ProcessMaker) -> None:
    proc = await make_process()
    other = await reader(make_process)
    await proc.store_messages("ch_r", [1, 2])
    entries = await proc.bus.index_range(wal_index("ch_r"), 0)
    await proc.bus.index_remove([(wal_index("ch_r"), key) for key, _ in entries])  # a Redis restart
    assert seqs(await other.read("ch_r", 0, 10)) == []
    await proc.writer.reindex()
    assert seqs(await other.read("ch_r", 0, 10)) == [1, 2]


async def test_close_stores_everything_in_segments(make_process: ProcessMaker) -> None:
    proc = await make_process(max_wait=1.0)
    acked: list[int] = []
    for seq in range(1, 11):
        proc.writer.add("ch_c", seq, message("ch_c", seq), lambda seq, _: acked.append(seq))
    await proc.writer.close()
    assert sorted(acked) == list(range(1, 11))
    assert await proc.store.list(keys.WAL_PREFIX) == []
    other = await reader(make_process)
    assert seqs(await other.read("ch_c", 0, 100)) == list(range(1, 11))


async def test_stale_index_entries_are_dropped_by_readers(make_process: ProcessMaker) -> None:
    proc = await make_process()
    await proc.bus.index_add([(wal_index("ch_s"), keys.wal("gone", 1), 5)])
    assert seqs(await proc.log.read("ch_s", 0, 10)) == []
    assert await proc.bus.index_range(wal_index("ch_s"), 0) == []


async def forget_index(bus: Bus, channels: list[str]) -> None:
    """What a Redis restart without persistence does to the write-ahead index (and its state)."""
    from agentchat.bus.keys import WAL_STATE_INDEX

    for index in [*(wal_index(channel) for channel in channels), WAL_STATE_INDEX]:
        entries = await bus.index_range(index, 0)
        await bus.index_remove([(index, member) for member, _ in entries])


async def test_a_read_after_the_bus_lost_the_index_while_a_process_was_dead_misses_nothing(
        make_process: ProcessMaker) -> None:
    dead = await make_process()
    survivor = await make_process(alive=lambda instance: instance != dead.instance)
    await survivor.store_messages("ch_lost", [1, 3])
    await dead.store_messages("ch_lost", [2, 4])  # acked, in write-ahead objects only
    dead.kill()
    await forget_index(survivor.bus, ["ch_lost"])
    # Not the periodic recovery, not a reconnect: the read itself finds the index incomplete.
    assert seqs(await survivor.log.read("ch_lost", 0, 100)) == [1, 2, 3, 4]
    assert await survivor.store.list(keys.wal_prefix(dead.instance)) == []  # recovered into segments
    assert seqs(await survivor.log.read("ch_lost", 1, 2)) == [2, 3]


async def record_in_flight(proc: Process, channel: str, numbers: list[int]) -> None:
    """What the sequencer records as it hands numbers out (``claim_and_publish``)."""
    await proc.bus.index_add([(bus_keys.IN_FLIGHT_PROCESSES, proc.instance, 0),
                              (bus_keys.in_flight_channels(proc.instance), channel, 0),
                              *((bus_keys.in_flight(channel, proc.instance), str(n), n) for n in numbers)])


async def test_numbers_a_dead_process_handed_out_and_never_stored_become_gaps_in_history(
        make_process: ProcessMaker) -> None:
    """Numbers 1-5 went out live; the process stored 1-2 in a segment and 3 in a write-ahead object,
    then died with 4 and 5 waiting. Recovery stores 3 and declares 4 and 5 gaps: history shows each
    number once, as a message or a gap (before: 4 and 5 simply missing, nothing saying so)."""
    dead = await make_process()
    await record_in_flight(dead, "ch_g", [1, 2, 3, 4, 5])
    await record_in_flight(dead, "ch_quiet", [9])  # never stored, on a channel it has no object of
    await dead.store_messages("ch_g", [1, 2])
    await dead.writer.compact(["ch_g"])
    await dead.store_messages("ch_g", [3])
    dead.kill()
    survivor = await make_process(alive=lambda instance: instance != dead.instance)  # recovers at start
    found = await survivor.log.read("ch_g", 0, 100)
    assert seqs(found) == [1, 2, 3, 4, 5]
    assert [frames.is_gap(frame) for frame in found] == [False, False, False, True, True]
    assert orjson.loads(found[3]) == {"type": "gap", "seq": 4, "channel": "ch_g", "ts": orjson.loads(found[3])["ts"]}
    assert [frames.is_gap(frame) for frame in await survivor.log.read("ch_quiet", 0, 100)] == [True]
    # Settled: nothing left in flight, and a second recovery declares nothing twice.
    assert await survivor.bus.index_range(bus_keys.in_flight("ch_g", dead.instance), 0) == []
    assert await survivor.bus.index_range(bus_keys.IN_FLIGHT_PROCESSES, 0) == []
    await survivor.writer.recovery.recover()
    assert seqs(await survivor.log.read("ch_g", 0, 100)) == [1, 2, 3, 4, 5]


async def test_a_live_process_numbers_in_flight_are_never_gaps(make_process: ProcessMaker) -> None:
    """Recovery declares gaps only for a process with no heartbeat."""
    live = await make_process()
    await record_in_flight(live, "ch_l", [1])
    other = await make_process()  # believes every process alive
    await other.writer.recovery.recover()
    assert await other.log.read("ch_l", 0, 10) == []
    assert await other.bus.index_range(bus_keys.in_flight("ch_l", live.instance), 0) == [("1", 1)]


async def test_recovery_hands_every_message_over_before_deleting_its_objects(make_process: ProcessMaker) -> None:
    dead = await make_process()
    await dead.store_messages("ch_h", [1, 2])
    await dead.writer.compact(["ch_h"])
    await dead.store_messages("ch_h", [3])
    await dead.store_messages("ch_k", [7])
    dead.kill()
    handed: dict[str, list[int]] = {}
    survivor = await make_process(alive=lambda instance: instance != dead.instance, start=False)

    async def on_recovered(found: dict[str, list[bytes]]) -> None:
        assert await survivor.store.list(keys.wal_prefix(dead.instance))  # the objects are still there
        for channel, frames_ in found.items():
            handed.setdefault(channel, []).extend(frame_seq(frame) for frame in frames_)

    async def is_alive(instance: str) -> bool:
        return instance != dead.instance

    await survivor.writer.start(is_alive, on_recovered)
    try:
        assert handed == {"ch_h": [3], "ch_k": [7]}
        assert await survivor.store.list(keys.wal_prefix(dead.instance)) == []
    finally:
        await survivor.writer.close()


async def test_a_segment_expired_between_listing_and_reading_leaves_the_rest_readable(
        make_process: ProcessMaker) -> None:
    writer_proc = await make_process()
    await writer_proc.store_messages("ch_x", [1, 2, 3])
    await writer_proc.writer.compact(["ch_x"])
    await writer_proc.store_messages("ch_x", [4, 5, 6])
    await writer_proc.writer.compact(["ch_x"])
    oldest = keys.segment("ch_x", 1, 3)
    store = writer_proc.store

    class ExpiresWhileRead:
        """The store as a reader sees it while the retention pass deletes the oldest segment."""

        def __getattr__(self, name: str) -> Any:
            return getattr(store, name)

        async def get(self, key: str) -> Any:
            if key == oldest:
                await store.delete(key)
            return await store.get(key)

    log = MessageLog(ExpiresWhileRead(), writer_proc.bus)  # type: ignore[arg-type]
    assert seqs(await log.read("ch_x", 0, 100)) == [4, 5, 6]
