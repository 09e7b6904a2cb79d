"""The indicators maths, driven with plain values and an injected clock: no event loop."""

from __future__ import annotations

import pytest

from agentchat.core.indicators import (MINUTE_MS, ChannelIndicators, IndicatorBook, RateWindow, Report,
                                       ReportBuilder, SharedCount, Throttle, agent_tag, coarse_minute_ms, group_by_channel,
                                       merge_counts, sort_indicators)

T0 = 1_767_225_600.0  # a whole minute


# ------------------------------------------------------------------------------ messages per minute


def test_rate_counts_the_last_sixty_seconds() -> None:
    rate = RateWindow()
    for i in range(60):
        rate.add(int(T0) + i, 2, T0 + i)
    assert rate.total(T0 + 59.9) == 120
    # every second the oldest bucket leaves the window
    assert rate.total(T0 + 60) == 118
    assert rate.total(T0 + 90) == 58
    assert rate.total(T0 + 118) == 2
    assert rate.total(T0 + 119) == 0


def test_rate_buckets_wrap_around_without_mixing_old_counts() -> None:
    rate = RateWindow(window=5)
    rate.add(int(T0), 7, T0)
    rate.add(int(T0) + 5, 1, T0 + 5)  # same slot, five seconds later: the 7 is gone
    assert rate.total(T0 + 5) == 1
    rate.add(int(T0) + 5, 1, T0 + 5.5)
    assert rate.total(T0 + 5.5) == 2


def test_rate_drops_too_old_counts_and_clamps_future_ones() -> None:
    rate = RateWindow()
    rate.add(int(T0) - 60, 5, T0)  # just out of the window
    rate.add(int(T0) - 59, 1, T0)  # just in it
    rate.add(int(T0) + 3, 4, T0)  # a process whose clock runs ahead: counted as now
    assert rate.total(T0) == 5
    assert rate.total(T0 + 59) == 4
    assert rate.total(T0 + 60) == 0
    rate.add(int(T0), 0, T0)
    rate.add(int(T0), -3, T0)
    assert rate.total(T0) == 5
    with pytest.raises(ValueError):
        RateWindow(window=0)


def test_last_activity_is_coarse_to_the_minute() -> None:
    assert coarse_minute_ms(T0) == int(T0) * 1000
    assert coarse_minute_ms(T0 + 59.999) == int(T0) * 1000
    assert coarse_minute_ms(T0 + 60) == int(T0) * 1000 + MINUTE_MS


# ------------------------------------------------------------------------------ throttle


def test_throttle_sends_at_most_once_per_second_whatever_the_rate() -> None:
    throttle: Throttle[str] = Throttle(1.0)
    sent: list[float] = []
    now = T0
    # 1,000 changes a second for five seconds, polling due() whenever the clock moves
    for step in range(5000):
        now = T0 + step / 1000
        if throttle.offer("ch", now):
            sent.append(now)
        sent.extend(now for _ in throttle.due(now))
    assert 5 <= len(sent) <= 6
    assert all(b - a >= 1.0 - 1e-9 for a, b in zip(sent, sent[1:]))


def test_throttle_sends_a_change_at_once_then_holds_the_next_for_the_rest_of_the_second() -> None:
    throttle: Throttle[str] = Throttle(1.0)
    assert throttle.offer("a", T0)
    assert not throttle.offer("a", T0 + 0.2)
    assert not throttle.offer("a", T0 + 0.3)  # already pending: still one update to send
    assert throttle.next_due() == T0 + 1.0
    assert throttle.due(T0 + 0.99) == []
    assert throttle.due(T0 + 1.0) == ["a"]
    assert throttle.next_due() is None
    assert throttle.due(T0 + 5) == []
    assert throttle.offer("a", T0 + 2.5)  # quiet for over a second: at once again


def test_throttle_keys_are_independent_and_pruned() -> None:
    throttle: Throttle[str] = Throttle(1.0)
    assert throttle.offer("a", T0)
    assert throttle.offer("b", T0 + 0.5)
    assert not throttle.offer("a", T0 + 0.6)
    assert throttle.due(T0 + 1.0) == ["a"]
    throttle.prune(T0 + 3)
    assert throttle.offer("a", T0 + 3) and throttle.offer("b", T0 + 3)


# ------------------------------------------------------------------------------ reports


def tags(*names: str) -> frozenset[str]:
    return frozenset(agent_tag(f"did:agentchat:{name}") for name in names)


def test_report_round_trips_and_refuses_garbage() -> None:
    report = Report("p1", {"ch_a": {int(T0): 3, int(T0) + 1: 1}}, {"ch_a": 10},
                    {"ch_a": tags("alice", "bob"), "ch_b": frozenset()}, full=True, created=["ch_c"])
    assert Report.from_bytes(report.to_bytes()) == report
    for bad in (b"", b"[]", b'{"v":3}', b'{"v":2,"p":"x","m":{"c":[1]},"n":{},"o":{},"f":false}',
                b'{"v":2,"p":"x","m":{},"n":{},"f":false}', b'{"v":2,"p":"x","m":{},"n":{"c":"x"},"o":{},"f":1}',
                b'{"v":2,"p":"x","m":{},"n":{},"o":{"c":3},"f":false}',
                b'{"v":2,"p":"x","m":{},"n":{},"o":{"c":[1]},"f":false}'):
        with pytest.raises(ValueError):
            Report.from_bytes(bad)


def test_agent_tags_are_short_stable_and_tell_agents_apart() -> None:
    dids = [f"did:agentchat:z6Mk{i:044d}" for i in range(5000)]
    assert agent_tag(dids[0]) == agent_tag(str(dids[0]))  # the same agent, the same tag, on every process
    assert all(len(agent_tag(did)) == 8 for did in dids)
    assert len({agent_tag(did) for did in dids}) == len(dids)


def test_a_report_from_a_process_not_yet_upgraded_counts_its_agents_apart() -> None:
    # Version 1 said how many agents, not which: during a rolling upgrade they count as others.
    old = Report.from_bytes(b'{"v":1,"p":"old","m":{},"n":{},"o":{"ch":2,"gone":0},"f":true}')
    assert old.presence == {"ch": frozenset({"old/0", "old/1"}), "gone": frozenset()}
    book = IndicatorBook()
    book.apply(old, T0)
    book.apply(Report("new", presence={"ch": tags("alice")}, full=True), T0)
    assert book.online("ch") == 3


def test_counts_grouped_by_channel_and_merged() -> None:
    grouped = group_by_channel({("a", 1): 2, ("a", 2): 1, ("b", 1): 5})
    assert grouped == {"a": {1: 2, 2: 1}, "b": {1: 5}}
    merge_counts(grouped, {"a": {2: 3}, "c": {9: 1}})
    assert grouped == {"a": {1: 2, 2: 4}, "b": {1: 5}, "c": {9: 1}}


def test_builder_reports_presence_changes_then_the_whole_table_periodically() -> None:
    builder = ReportBuilder("p1", full_every=3)
    first = builder.build({}, {}, {"a": tags("x"), "b": tags("x", "y")})
    assert first is not None and first.full and first.presence == {"a": tags("x"), "b": tags("x", "y")}
    second = builder.build({}, {}, {"a": tags("x"), "b": tags("x", "z")})  # same size, another agent
    assert second is not None and not second.full and second.presence == {"b": tags("x", "z")}
    third = builder.build({"a": {1: 4}}, {"a": 40}, {"b": tags("x", "z")})
    assert third is not None and third.presence == {"a": frozenset()} and third.messages == {"a": {1: 4}}
    fourth = builder.build({}, {}, {"b": tags("x", "z")})
    assert fourth is not None and fourth.full and fourth.presence == {"b": tags("x", "z")}
    # nobody online and nothing said: nothing to publish (except the periodic full table)
    idle = ReportBuilder("p2", full_every=3)
    assert idle.build({}, {}, {}) is not None  # first: full
    assert idle.build({}, {}, {}) is None
    assert idle.build({}, {}, {}) is None
    assert idle.build({}, {}, {}) is not None
    assert idle.build({}, {"a": 3}, {}) is not None  # a total that was waiting
    assert idle.build({}, {}, {}, ["ch_new"]) is not None  # a channel was created


def test_builder_heartbeats_while_agents_are_online() -> None:
    builder = ReportBuilder("p1", full_every=100)
    builder.build({}, {}, {"a": tags("x")})
    heartbeat = builder.build({}, {}, {"a": tags("x")})
    assert heartbeat is not None and heartbeat.presence == {} and heartbeat.messages == {}


# ------------------------------------------------------------------------------ the shared counter


def test_shared_count_adds_per_second_counts_and_keeps_the_last_minute() -> None:
    s = int(T0)
    count = SharedCount().add({s: 3, s + 61: 2})
    assert count.total == 5 and count.last_activity_ms == coarse_minute_ms(s + 61)
    assert count.add({s: 1}).last_activity_ms == coarse_minute_ms(s + 61)  # never goes back
    assert count.add({}) is count and count.add({s: 0}) is count
    assert SharedCount.from_bytes(count.to_bytes()) == count


def test_a_forgotten_counter_is_split_at_since_between_deltas_and_the_recount() -> None:
    """Messages before ``since`` are the recount's, those from ``since`` on the deltas': each message
    is counted once, whichever side of the line its process's report falls."""
    s = int(T0)
    fresh = SharedCount(since=s, counted=False)
    # a late report with seconds before and after the line: only the part from ``since`` on is added
    after = fresh.add({s - 2: 4, s - 1: 1, s: 2, s + 1: 3})
    assert after.total == 5 and not after.counted
    assert after.add({s - 5: 9}) is after
    # the recount: what the store holds from before ``since``
    done = after.with_recount(5, coarse_minute_ms(s - 1))
    assert done.total == 10 and done.counted and done.last_activity_ms == coarse_minute_ms(s + 1)
    assert done.with_recount(5, None) is done  # only once
    assert SharedCount.from_bytes(done.to_bytes()) == done
    # an old counter written before ``since`` existed reads as counted
    assert SharedCount.from_bytes(b'{"total": 7, "last": null}') == SharedCount(7, None, 0, True)


# ------------------------------------------------------------------------------ merging processes


def test_book_merges_message_deltas_of_several_processes() -> None:
    book = IndicatorBook()
    s = int(T0)
    book.apply(Report("p1", {"ch": {s: 3}}, {"ch": 3}), T0)
    book.apply(Report("p2", {"ch": {s: 2}}, {"ch": 5}), T0)
    book.apply(Report("p1", {"ch": {s + 1: 1}}, {"ch": 6}), T0 + 1)
    assert book.per_minute("ch", T0 + 1) == 6
    assert book.total("ch") == 6
    assert book.last_activity_ms("ch") == coarse_minute_ms(T0)
    # totals only grow: a report delivered late does not lower the total
    assert book.apply(Report("p2", {}, {"ch": 5}), T0 + 1) == set()
    assert book.total("ch") == 6
    assert book.per_minute("ch", T0 + 61) == 0
    assert book.apply(Report("p2", created=["new"]), T0 + 61) == {"new"}
    assert book.per_minute("unknown", T0) == 0 and book.total("unknown") == 0


def test_book_presence_counts_distinct_agents_over_processes_and_forgets_the_silent_ones() -> None:
    book = IndicatorBook(presence_ttl=5.0)
    assert book.apply(Report("p1", presence={"ch": tags("a", "b"), "other": tags("a")}, full=True), T0) == {"ch", "other"}
    assert book.apply(Report("p2", presence={"ch": tags("c")}, full=True), T0) == {"ch"}
    assert book.online("ch") == 3
    # b reconnects to p2 before its socket on p1 is gone: still one agent
    assert book.apply(Report("p2", presence={"ch": tags("b", "c")}), T0 + 0.5) == {"ch"}
    assert book.online("ch") == 3
    assert book.apply(Report("p1", presence={"ch": frozenset()}), T0 + 1) == {"ch"}
    assert book.online("ch") == 2 and book.online("other") == 1
    assert book.apply(Report("p1"), T0 + 4) == set()  # heartbeat
    assert book.expire(T0 + 5.6) == {"ch"}  # p2 has been silent for 5.1 s
    assert book.online("ch") == 0 and book.online("other") == 1
    # a full table replaces the previous one
    assert book.apply(Report("p1", presence={"ch": tags("a", "b", "c", "d")}, full=True), T0 + 6) == {"ch", "other"}
    assert book.online("other") == 0 and book.online("ch") == 4


def test_book_takes_stored_numbers_without_going_backwards() -> None:
    book = IndicatorBook()
    assert book.set_stored("ch", 100, coarse_minute_ms(T0))
    assert not book.set_stored("ch", 90, coarse_minute_ms(T0) - MINUTE_MS)
    assert book.total("ch") == 100 and book.last_activity_ms("ch") == coarse_minute_ms(T0)
    book.apply(Report("p1", {"ch": {int(T0) + 61: 1}}, {"ch": 101}), T0 + 61)
    assert book.total("ch") == 101 and book.last_activity_ms("ch") == coarse_minute_ms(T0) + MINUTE_MS


def test_book_lists_channels_whose_rate_slides_until_it_is_zero() -> None:
    book = IndicatorBook()
    book.apply(Report("p1", {"ch": {int(T0): 1}}, {"ch": 1}), T0)
    assert book.sliding(T0 + 30) == {"ch"}
    assert book.sliding(T0 + 60) == {"ch"}  # the last look that sees it drop to 0
    assert book.sliding(T0 + 61) == set()


# ------------------------------------------------------------------------------ views


def indicators(channel: str, **numbers: int) -> ChannelIndicators:
    base = {"members": 0, "agents_online": 0, "messages_total": 0, "messages_per_minute": 0,
            "last_activity_at": 0, "peeks_total": 0, "peeks_active": 0}
    return ChannelIndicators(channel=channel, name="", **{**base, **numbers})  # type: ignore[arg-type]


def test_sorts_break_ties_by_channel_id() -> None:
    items = [indicators("ch_c", messages_per_minute=5), indicators("ch_a", messages_per_minute=5, agents_online=1),
             indicators("ch_b", messages_total=9), indicators("ch_d", messages_per_minute=5)]
    assert [i.channel for i in sort_indicators(items, "active")] == ["ch_a", "ch_c", "ch_d", "ch_b"]
    assert [i.channel for i in sort_indicators(items, "messages")] == ["ch_b", "ch_a", "ch_c", "ch_d"]
    assert [i.channel for i in sort_indicators(items, "channel")] == ["ch_a", "ch_b", "ch_c", "ch_d"]


def test_the_wire_view_has_counts_only() -> None:
    wire = indicators("ch_a", members=3, peeks_total=2, peeks_active=1).to_wire()
    assert wire["peeks"] == {"total": 2, "active": 1}
    assert set(wire) == {"channel", "name", "members", "agents_online", "messages_total", "messages_per_minute",
                         "last_activity_at", "peeks"}
