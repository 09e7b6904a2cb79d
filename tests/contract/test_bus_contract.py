"""The ``Bus`` contract (``agentchat/bus/base.py``), run against every implementation.

Two buses on one backend stand for two server processes. "Nothing was delivered" is checked with a
marker: a message published afterwards on another subscribed topic; the bus delivers in order, so once
the marker arrives, anything published before it would have arrived too.
"""

from __future__ import annotations

import asyncio
import itertools

import pytest

from tests.contract.conftest import Node, NodeMaker

_markers = itertools.count(1)


async def flush(publisher: Node, *subscribers: Node) -> None:
    """Publish a marker and wait until every subscriber has it."""
    marker = f"marker-{next(_markers)}"
    for node in subscribers:
        await node.bus.subscribe(marker)
    await publisher.bus.publish(marker, b"m")
    for node in subscribers:
        await node.received.wait_count(marker, 1)


# -- pub/sub ------------------------------------------------------------------------------------


async def test_publish_reaches_every_subscribed_bus(nodes: tuple[Node, Node]) -> None:
    a, b = nodes
    await a.bus.subscribe("t")
    await b.bus.subscribe("t")
    await a.bus.publish("t", b"hello")
    await a.received.wait_count("t", 1)
    await b.received.wait_count("t", 1)
    assert a.received.on("t") == [(0, b"hello")]
    assert b.received.on("t") == [(0, b"hello")]


async def test_subscription_is_in_effect_when_subscribe_returns(make_node: NodeMaker) -> None:
    a, b = await make_node(), await make_node()
    for i in range(20):  # published the moment subscribe returns, from the other process
        await b.bus.subscribe(f"t{i}")
        await a.bus.publish(f"t{i}", b"x")
    for i in range(20):
        await b.received.wait_count(f"t{i}", 1)


async def test_only_subscribed_topics_are_delivered(nodes: tuple[Node, Node]) -> None:
    a, b = nodes
    await b.bus.subscribe("wanted")
    await a.bus.publish("other", b"no")
    await a.bus.publish("wanted", b"yes")
    await flush(a, b)
    assert [t for t, _, _ in b.received.messages if not t.startswith("marker")] == ["wanted"]


async def test_bodies_are_opaque_bytes(nodes: tuple[Node, Node]) -> None:
    a, b = nodes
    body = bytes(range(256)) + b"12:34:" + b"\x00" * 3
    await b.bus.subscribe("c:bin")
    await a.bus.publish("c:bin", body)
    await a.bus.publish("c:bin", b"")
    await a.bus.seed_sequence("seq:bin", 0)
    seq = await a.bus.publish_sequenced("c:bin", "seq:bin", body)
    await b.received.wait_count("c:bin", 3)
    assert b.received.on("c:bin") == [(0, body), (0, b""), (seq, body)]


async def test_at_most_once_and_not_before_subscribing(nodes: tuple[Node, Node]) -> None:
    a, b = nodes
    await a.bus.publish("t", b"before")
    await b.bus.subscribe("t")
    await b.bus.subscribe("t")  # subscribing twice does not double delivery
    await a.bus.publish("t", b"after")
    await flush(a, b)
    assert b.received.on("t") == [(0, b"after")]


async def test_concurrent_subscribes(nodes: tuple[Node, Node]) -> None:
    a, b = nodes
    topics = [f"many-{i}" for i in range(50)]
    await asyncio.gather(*(b.bus.subscribe(t) for t in topics))
    await asyncio.gather(*(a.bus.publish(t, t.encode()) for t in topics))
    for t in topics:
        await b.received.wait_count(t, 1)
        assert b.received.on(t) == [(0, t.encode())]


async def test_unsubscribe_stops_delivery(nodes: tuple[Node, Node]) -> None:
    a, b = nodes
    await a.bus.subscribe("t")
    await b.bus.subscribe("t")
    await a.bus.publish("t", b"1")
    await b.received.wait_count("t", 1)
    await b.bus.unsubscribe("t")
    await b.bus.unsubscribe("t")  # unsubscribing twice is harmless
    await b.bus.unsubscribe("never-subscribed")
    await a.bus.publish("t", b"2")
    await flush(a, a, b)
    assert b.received.on("t") == [(0, b"1")]
    assert a.received.on("t") == [(0, b"1"), (0, b"2")]  # the other process still has it
    await b.bus.subscribe("t")  # and a topic can be subscribed again
    await a.bus.publish("t", b"3")
    await b.received.wait_count("t", 2)
    assert b.received.on("t") == [(0, b"1"), (0, b"3")]


async def test_a_failing_handler_does_not_stop_delivery(nodes: tuple[Node, Node]) -> None:
    a, b = nodes
    b.received.fail_on = b"boom"
    await b.bus.subscribe("t")
    await a.bus.publish("t", b"boom")
    await a.bus.publish("t", b"fine")
    await b.received.wait_count("t", 2)
    assert b.received.on("t") == [(0, b"boom"), (0, b"fine")]


async def test_ping(nodes: tuple[Node, Node]) -> None:
    await nodes[0].bus.ping()


# -- sequencing ---------------------------------------------------------------------------------


async def test_forgotten_counter_returns_none_and_publishes_nothing(nodes: tuple[Node, Node]) -> None:
    a, b = nodes
    await b.bus.subscribe("c:t")
    assert await a.bus.publish_sequenced("c:t", "seq:t", b"x") is None
    await flush(a, b)
    assert b.received.on("c:t") == []


async def test_seed_sequence_only_raises_the_counter(nodes: tuple[Node, Node]) -> None:
    a, b = nodes
    await a.bus.seed_sequence("seq:t", 41)
    assert await a.bus.publish_sequenced("c:t", "seq:t", b"x") == 42
    await b.bus.seed_sequence("seq:t", 10)  # lower than the counter: no change
    assert await b.bus.publish_sequenced("c:t", "seq:t", b"x") == 43
    await b.bus.seed_sequence("seq:t", 43)
    assert await a.bus.publish_sequenced("c:t", "seq:t", b"x") == 44
    await b.bus.seed_sequence("seq:t", 100)
    assert await a.bus.publish_sequenced("c:t", "seq:t", b"x") == 101
    await a.bus.seed_sequence("seq:zero", 0)
    assert await a.bus.publish_sequenced("c:zero", "seq:zero", b"x") == 1


async def test_read_counters_sees_every_process_s_raises_in_one_call(nodes: tuple[Node, Node]) -> None:
    a, b = nodes
    assert await a.bus.read_counters([]) == []
    assert await a.bus.read_counters(["mv:x", "mv:y"]) == [None, None]
    await a.bus.seed_sequence("mv:x", 3)
    await b.bus.seed_sequence("mv:x", 2)  # a raise only: the higher value stays
    await b.bus.seed_sequence("mv:y", 0)
    assert await b.bus.read_counters(["mv:x", "mv:y", "mv:z"]) == [3, 0, None]
    await a.bus.publish_sequenced("c:y", "mv:y", b"x")  # one channel: the cluster keeps it in one slot
    assert await a.bus.read_counters(["mv:y"]) == [1]


async def test_sequenced_publishes_are_delivered_in_order_across_processes(
    make_node: NodeMaker,
) -> None:
    a, b, reader = await make_node(), await make_node(), await make_node()
    for node in (a, b, reader):
        await node.bus.subscribe("c:ch")
    await a.bus.seed_sequence("seq:ch", 0)
    n = 300

    async def send(node: Node, i: int) -> tuple[int | None, bytes]:
        body = f"msg-{i}".encode()
        return await node.bus.publish_sequenced("c:ch", "seq:ch", body), body

    sent = await asyncio.gather(*(send(a if i % 2 else b, i) for i in range(n)))
    assert sorted(seq for seq, _ in sent) == list(range(1, n + 1))  # each number handed out once
    expected = sorted((seq, body) for seq, body in sent)
    for node in (a, b, reader):
        await node.received.wait_count("c:ch", n)
        assert node.received.on("c:ch") == expected  # strictly increasing, each once, body with its seq


async def test_counters_are_independent(nodes: tuple[Node, Node]) -> None:
    a, b = nodes
    await a.bus.seed_sequence("seq:c1", 0)
    await a.bus.seed_sequence("seq:c2", 7)
    assert await a.bus.publish_sequenced("c:c1", "seq:c1", b"x") == 1
    assert await b.bus.publish_sequenced("c:c2", "seq:c2", b"x") == 8
    assert await b.bus.publish_sequenced("c:c1", "seq:c1", b"x") == 2


# -- values -------------------------------------------------------------------------------------


async def test_set_get_delete(nodes: tuple[Node, Node]) -> None:
    a, b = nodes
    assert await a.bus.get("k") is None
    await a.bus.set("k", b"\x00v1\xff", ttl=30)
    assert await b.bus.get("k") == b"\x00v1\xff"
    await b.bus.set("k", b"v2", ttl=30)
    assert await a.bus.get("k") == b"v2"
    await a.bus.delete("k")
    await a.bus.delete("k")  # deleting a missing key is fine
    assert await b.bus.get("k") is None


async def test_set_many_sets_every_key_with_its_ttl(nodes: tuple[Node, Node]) -> None:
    a, b = nodes
    await a.bus.set("old", b"x", ttl=30)
    await a.bus.set_many([("m1", b"\x00one"), ("m2", b"two"), ("old", b"new")], ttl=TTL)
    assert [await b.bus.get(k) for k in ("m1", "m2", "old")] == [b"\x00one", b"two", b"new"]
    await a.bus.set_many([], ttl=30)  # nothing to do is fine
    await asyncio.sleep(AFTER)
    assert [await b.bus.get(k) for k in ("m1", "m2", "old")] == [None, None, None]


async def test_set_if_absent_race_has_one_winner(nodes: tuple[Node, Node]) -> None:
    a, b = nodes
    results = await asyncio.gather(
        *((a if i % 2 else b).bus.set_if_absent("once", f"v{i}".encode(), ttl=30) for i in range(50))
    )
    winners = [i for i, r in enumerate(results) if r is None]
    assert len(winners) == 1
    stored = f"v{winners[0]}".encode()
    assert all(r == stored for r in results if r is not None)  # losers are told the existing value
    assert await a.bus.get("once") == stored


async def test_take_race_has_one_winner(nodes: tuple[Node, Node]) -> None:
    a, b = nodes
    await a.bus.set("challenge", b"nonce", ttl=30)
    results = await asyncio.gather(*((a if i % 2 else b).bus.take("challenge") for i in range(50)))
    assert results.count(b"nonce") == 1
    assert results.count(None) == 49
    assert await a.bus.get("challenge") is None
    assert await a.bus.take("missing") is None


async def test_compare_and_set(nodes: tuple[Node, Node]) -> None:
    a, b = nodes
    assert await a.bus.compare_and_set("state", b"x", b"y", ttl=30) is False  # absent, not b"x"
    assert await a.bus.compare_and_set("state", None, b"countdown", ttl=30) is True
    assert await b.bus.compare_and_set("state", None, b"other", ttl=30) is False  # no longer absent
    assert await b.bus.compare_and_set("state", b"wrong", b"other", ttl=30) is False
    assert await b.bus.get("state") == b"countdown"
    assert await b.bus.compare_and_set("state", b"countdown", b"active", ttl=30) is True
    assert await a.bus.get("state") == b"active"


async def test_compare_and_set_race_has_one_winner(nodes: tuple[Node, Node]) -> None:
    a, b = nodes  # a refusal racing the deadline: exactly one outcome
    await a.bus.set("peek", b"countdown", ttl=30)
    results = await asyncio.gather(
        *((a if i % 2 else b).bus.compare_and_set("peek", b"countdown", f"end-{i}".encode(), ttl=30)
          for i in range(50))
    )
    assert results.count(True) == 1
    assert await b.bus.get("peek") == f"end-{results.index(True)}".encode()


async def test_compare_and_set_from_absent_race_has_one_winner(nodes: tuple[Node, Node]) -> None:
    a, b = nodes
    results = await asyncio.gather(
        *((a if i % 2 else b).bus.compare_and_set("lock", None, f"{i}".encode(), ttl=30) for i in range(50))
    )
    assert results.count(True) == 1


async def test_incr_counts_across_processes(nodes: tuple[Node, Node]) -> None:
    a, b = nodes
    results = await asyncio.gather(*((a if i % 2 else b).bus.incr("hits", ttl=30) for i in range(100)))
    assert sorted(results) == list(range(1, 101))
    assert await a.bus.get("hits") == b"100"


async def test_incr_by_an_amount(nodes: tuple[Node, Node]) -> None:
    a, b = nodes
    assert await a.bus.incr("weighted", ttl=30, amount=5) == 5
    assert await b.bus.incr("weighted", ttl=30, amount=3) == 8
    assert await b.bus.incr("weighted", ttl=30) == 9


# -- expiry -------------------------------------------------------------------------------------

TTL = 0.15  # seconds; long enough to read the value back on a loaded machine
AFTER = TTL + 0.1


async def test_values_expire(nodes: tuple[Node, Node]) -> None:
    a, b = nodes
    await a.bus.set("short", b"1", ttl=TTL)
    await a.bus.set("long", b"1", ttl=30)
    assert await a.bus.set_if_absent("once", b"1", ttl=TTL) is None
    assert await a.bus.compare_and_set("cas", None, b"1", ttl=TTL) is True
    await a.bus.set("taken", b"1", ttl=TTL)
    assert await b.bus.get("short") == b"1"
    await asyncio.sleep(AFTER)
    assert await b.bus.get("short") is None
    assert await b.bus.get("long") == b"1"
    assert await b.bus.take("taken") is None
    assert await b.bus.set_if_absent("once", b"2", ttl=30) is None  # expired: absent again
    assert await b.bus.compare_and_set("cas", None, b"2", ttl=30) is True


async def test_set_replaces_the_ttl(nodes: tuple[Node, Node]) -> None:
    a, b = nodes
    await a.bus.set("k", b"1", ttl=TTL)
    await a.bus.set("k", b"2", ttl=30)
    await asyncio.sleep(AFTER)
    assert await b.bus.get("k") == b"2"


async def test_incr_window_starts_at_creation(nodes: tuple[Node, Node]) -> None:
    a, b = nodes  # a fixed window: later increments do not extend it
    assert await a.bus.incr("rate", ttl=TTL) == 1
    await asyncio.sleep(TTL / 2)
    assert await b.bus.incr("rate", ttl=TTL) == 2
    await asyncio.sleep(AFTER - TTL / 2)
    assert await a.bus.get("rate") is None
    assert await a.bus.incr("rate", ttl=30) == 1


@pytest.mark.parametrize("ttl", [0, -1])
async def test_ttl_must_be_positive(nodes: tuple[Node, Node], ttl: float) -> None:
    bus = nodes[0].bus
    with pytest.raises(ValueError):
        await bus.set("k", b"v", ttl=ttl)
    with pytest.raises(ValueError):
        await bus.incr("k", ttl=ttl)


# -- sorted indexes -----------------------------------------------------------------------------


async def test_index_range_orders_by_score_then_member_from_min_score(nodes: tuple[Node, Node]) -> None:
    a, b = nodes
    assert await a.bus.index_range("wal:c", 0) == []  # a missing index is empty
    await a.bus.index_add([
        ("wal:c", "wal/b/3", 30), ("wal:c", "wal/b/1", 10), ("wal:c", "wal/a/2", 20), ("wal:c", "wal/b/2", 20)
    ])
    everything = [("wal/b/1", 10), ("wal/a/2", 20), ("wal/b/2", 20), ("wal/b/3", 30)]
    assert await b.bus.index_range("wal:c", 0) == everything
    assert await b.bus.index_range("wal:c", 20) == everything[1:]  # min_score is included
    assert await b.bus.index_range("wal:c", 21) == everything[3:]
    assert await b.bus.index_range("wal:c", 31) == []


async def test_index_add_replaces_the_score_and_keeps_indexes_apart(nodes: tuple[Node, Node]) -> None:
    a, b = nodes
    big = 2**53
    await a.bus.index_add([("i1", "m", 5), ("i2", "m", 7), ("i1", "n", 6)])
    await b.bus.index_add([("i1", "m", big)])
    assert await a.bus.index_range("i1", 0) == [("n", 6), ("m", big)]
    assert await a.bus.index_range("i1", big) == [("m", big)]
    assert await a.bus.index_range("i2", 0) == [("m", 7)]
    await a.bus.set("i1", b"a value", ttl=30)  # values and indexes have names of their own
    assert await b.bus.index_range("i1", 0) == [("n", 6), ("m", big)]
    assert await b.bus.get("i1") == b"a value"


async def test_index_remove(nodes: tuple[Node, Node]) -> None:
    a, b = nodes
    await a.bus.index_add([("i1", "m1", 1), ("i1", "m2", 2), ("i2", "m1", 1)])
    await b.bus.index_remove([("i1", "m1"), ("i1", "missing"), ("missing", "m1"), ("i2", "m1")])
    assert await a.bus.index_range("i1", 0) == [("m2", 2)]
    assert await a.bus.index_range("i2", 0) == []  # left empty: gone
    await b.bus.index_add([("i2", "m3", 3)])  # and usable again
    assert await a.bus.index_range("i2", 0) == [("m3", 3)]


async def test_index_operations_with_no_items_do_nothing(nodes: tuple[Node, Node]) -> None:
    a, b = nodes
    await a.bus.index_add([("i", "m", 1)])
    await a.bus.index_add([])
    await b.bus.index_remove([])
    assert await b.bus.index_range("i", 0) == [("m", 1)]


async def test_concurrent_index_writers_on_two_processes(nodes: tuple[Node, Node]) -> None:
    a, b = nodes
    await asyncio.gather(
        *((a if i % 2 else b).bus.index_add([("wal:c", f"wal/{i:04d}", i)]) for i in range(50))
    )
    assert await a.bus.index_range("wal:c", 40) == [(f"wal/{i:04d}", i) for i in range(40, 50)]
    await asyncio.gather(
        *((a if i % 2 else b).bus.index_remove([("wal:c", f"wal/{i:04d}")]) for i in range(45))
    )
    assert await b.bus.index_range("wal:c", 0) == [(f"wal/{i:04d}", i) for i in range(45, 50)]


async def test_index_scores_must_be_within_2_pow_53(nodes: tuple[Node, Node]) -> None:
    bus = nodes[0].bus
    with pytest.raises(ValueError):
        await bus.index_add([("i", "ok", 1), ("i", "m", 2**53 + 1)])
    assert await bus.index_range("i", 0) == []  # nothing of a refused call was added


FLIGHT = "inflight:ch:a"  # process a's numbers of channel ch not stored yet


async def test_claim_and_publish(nodes: tuple[Node, Node]) -> None:
    a, b = nodes
    await b.bus.subscribe("c:ch")
    # Unknown counter: nothing claimed, nothing published.
    assert await a.bus.claim_and_publish("cid:ch:a:1", b"p:a", 30, "c:ch", "seq:ch", b"one", in_flight=FLIGHT) is None
    assert await a.bus.get("cid:ch:a:1") is None
    await a.bus.seed_sequence("seq:ch", 10)
    assert await a.bus.claim_and_publish("cid:ch:a:1", b"p:a", 30, "c:ch", "seq:ch", b"one", in_flight=FLIGHT) == 11
    assert await a.bus.get("cid:ch:a:1") == b"p:a"
    await b.received.wait_count("c:ch", 1)
    assert b.received.on("c:ch") == [(11, b"one")]
    # The claim exists (another process, or a retry): its value comes back and nothing is published.
    assert await b.bus.claim_and_publish("cid:ch:a:1", b"p:b", 30, "c:ch", "seq:ch", b"again", in_flight="inflight:ch:b") == b"p:a"
    assert await a.bus.claim_and_publish("cid:ch:a:2", b"p:a", 30, "c:ch", "seq:ch", b"two", in_flight=FLIGHT) == 12
    await b.received.wait_count("c:ch", 2)
    assert b.received.on("c:ch") == [(11, b"one"), (12, b"two")]


async def test_claim_and_publish_records_each_number_in_flight_in_the_same_step(nodes: tuple[Node, Node]) -> None:
    """Every number handed out is in the sender's in-flight index when the call returns (any process
    can read it); a call that hands out no number (unknown counter, existing claim) records nothing."""
    a, b = nodes
    assert await a.bus.claim_and_publish("cid:ch:a:1", b"p:a", 30, "c:ch", "seq:ch", b"one", in_flight=FLIGHT) is None
    assert await b.bus.index_range(FLIGHT, 0) == []
    await a.bus.seed_sequence("seq:ch", 10)
    assert await a.bus.claim_and_publish("cid:ch:a:1", b"p:a", 30, "c:ch", "seq:ch", b"one", in_flight=FLIGHT) == 11
    assert await b.bus.index_range(FLIGHT, 0) == [("11", 11)]
    assert await b.bus.claim_and_publish("cid:ch:a:1", b"p:b", 30, "c:ch", "seq:ch", b"x",
                                         in_flight="inflight:ch:b") == b"p:a"
    assert await b.bus.index_range("inflight:ch:b", 0) == []
    numbers = await asyncio.gather(*(a.bus.claim_and_publish(f"cid:ch:a:{i}", b"p:a", 30, "c:ch", "seq:ch", b"m",
                                                             in_flight=FLIGHT) for i in range(2, 40)))
    assert sorted(numbers) == list(range(12, 50))  # type: ignore[type-var]
    assert await b.bus.index_range(FLIGHT, 0) == [(str(n), n) for n in range(11, 50)]
    # Stored: the sender removes them, many in one call.
    await a.bus.index_remove([(FLIGHT, str(n)) for n in range(11, 49)])
    assert await b.bus.index_range(FLIGHT, 0) == [("49", 49)]


async def test_concurrent_claims_on_one_channel(nodes: tuple[Node, Node]) -> None:
    """Many sends of one channel at once (one event-loop turn): each gets its own number, a client id
    sent twice is claimed once, and every reader gets each body with its number, in order."""
    a, b = nodes
    await b.bus.subscribe("c:many")
    await a.bus.seed_sequence("seq:many", 0)
    bodies = [b"", b"*", b"1:2:", b"x" * 3000] + [f"m{i}".encode() for i in range(60)]
    claims = [f"cid:many:s:{i}" for i in range(len(bodies))] + ["cid:many:s:0"]
    outcomes = await asyncio.gather(*(a.bus.claim_and_publish(claim, b"p:a", 30, "c:many", "seq:many", body,
                                                            in_flight="inflight:many:a")
                                      for claim, body in zip(claims, bodies + [b"again"])))
    assert outcomes[-1] == b"p:a", "the same client id twice: the second finds the first's claim"
    numbers = outcomes[:-1]
    assert sorted(numbers) == list(range(1, len(bodies) + 1))  # type: ignore[type-var]
    await b.received.wait_count("c:many", len(bodies))
    assert b.received.on("c:many") == sorted(zip(numbers, bodies))  # type: ignore[arg-type]


async def test_a_round_larger_than_one_script_call(nodes: tuple[Node, Node]) -> None:
    """More sends of one channel in one turn than one bus call takes (1,000 on Redis, where Lua can unpack at most 8,000 values): every one gets
    its own number in order, is recorded in flight, and one removal clears them all."""
    a, b = nodes
    await b.bus.subscribe("c:big")
    await a.bus.seed_sequence("seq:big", 0)
    count = 4_500
    numbers = await asyncio.gather(*(a.bus.claim_and_publish(f"cid:big:s:{i}", b"p:a", 30, "c:big", "seq:big",
                                                             str(i).encode(), in_flight="inflight:big:a")
                                     for i in range(count)))
    assert numbers == list(range(1, count + 1)), "one channel's calls keep the order of its sends"
    await b.received.wait_count("c:big", count)
    assert b.received.on("c:big") == [(i + 1, str(i).encode()) for i in range(count)]
    assert len(await b.bus.index_range("inflight:big:a", 0)) == count
    await a.bus.index_remove([("inflight:big:a", str(n)) for n in range(1, count + 1)]
                             + [("inflight:other:a", "1")])
    assert await b.bus.index_range("inflight:big:a", 0) == []


async def test_one_round_over_many_channels(nodes: tuple[Node, Node]) -> None:
    """Sends to many channels in one turn, 1,500 in all: each channel numbers its own in send order, a
    client id sent twice is claimed once, and every reader gets each channel's messages in order."""
    a, b = nodes
    channels = [f"r{i}" for i in range(5)]
    for channel in channels:
        await b.bus.subscribe(f"c:{channel}")
        await a.bus.seed_sequence(f"seq:{channel}", 100)
    sends = [(channel, i) for i in range(300) for channel in channels]  # interleaved, 1,500 in all
    outcomes = await asyncio.gather(
        *(a.bus.claim_and_publish(f"cid:{channel}:s:{i}", b"p:a", 30, f"c:{channel}", f"seq:{channel}",
                                  f"{channel}-{i}".encode(), in_flight=f"inflight:{channel}:a")
          for channel, i in sends),
        a.bus.claim_and_publish("cid:r2:s:7", b"p:a", 30, "c:r2", "seq:r2", b"again", in_flight="inflight:r2:a"))
    assert outcomes[-1] == b"p:a"
    for channel in channels:
        numbers = [n for (ch, _), n in zip(sends, outcomes) if ch == channel]
        assert numbers == list(range(101, 401)), channel
        await b.received.wait_count(f"c:{channel}", 300)
        assert b.received.on(f"c:{channel}") == [(101 + i, f"{channel}-{i}".encode()) for i in range(300)]
