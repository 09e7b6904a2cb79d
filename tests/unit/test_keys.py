"""The stored key layouts: data written by earlier versions (object store) and keys held by a Redis that
outlives an upgrade (bus) must still be found under the same names."""

from __future__ import annotations

from agentchat.bus import keys as bus_keys
from agentchat.store import keys as store_keys

DID = "did:agentchat:z6Mk"


def test_store_layout_is_unchanged() -> None:
    assert store_keys.agent(DID) == f"agents/{DID}.json"
    assert store_keys.channel("ch_1") == "channels/ch_1/meta.json"
    assert store_keys.epoch("ch_1", 3) == "channels/ch_1/epochs/0000000003.json"
    assert store_keys.membership(DID, "ch_1") == f"memberships/{DID}/ch_1"
    assert store_keys.channel_index("ch_1") == "channel-index/ch_1"
    assert store_keys.segment("ch_1", 1, 20) == "messages/ch_1/0000000000000020-0000000000000001.seg"
    assert store_keys.wal("i1", 7) == "wal/i1/0000000000000007.wal"
    assert store_keys.peek("pk_1") == "peeks/pk_1.json"
    assert store_keys.peek_index("ch_1", "pk_1") == "peek-index/ch_1/pk_1"
    assert store_keys.peek_open("pk_1") == "peeks-open/pk_1"
    assert store_keys.peek_payment("pk_1") == "peek-payments/pk_1.json"
    assert store_keys.peek_refusal("pk_1", DID) == f"peek-refusals/pk_1/{DID}.json"
    assert store_keys.peek_grant("pk_1", 2) == "peek-grants/pk_1/0000000002.json"
    assert store_keys.balance_holds(DID) == f"balance-holds/{DID}.json"
    assert store_keys.card(DID) == f"cards/{DID}.json"
    assert store_keys.peek_choice(DID) == f"peek-choices/{DID}.json"
    assert store_keys.peek_due(1_700_000_000_123, "pk_1") == "peeks-due/001700000000123/pk_1"
    assert store_keys.parse_peek_due("peeks-due/001700000000123/pk_1") == (1_700_000_000_123, "pk_1")
    assert store_keys.ledger_txn("capture/pk_1") == "ledger/txns/capture/pk_1.json"
    assert store_keys.ledger_entry("platform", "capture/pk_1") == "ledger/accounts/platform/capture/pk_1"
    assert store_keys.channel_tombstone("ch_1") == "tombstones/channels/ch_1"
    assert store_keys.agent_tombstone(DID) == f"tombstones/agents/{DID}"
    assert store_keys.retention_index("ch_1") == "retention-index/ch_1"
    assert store_keys.server_secret() == "server/token-secret"
    assert store_keys.clean_shutdown() == "server/clean-shutdown"


def test_bus_layout_is_unchanged() -> None:
    assert bus_keys.channel_messages("ch_1") == "c:ch_1"
    assert bus_keys.channel_events("ch_1") == "e:ch_1"
    assert bus_keys.agent_events(DID) == f"a:{DID}"
    assert (bus_keys.PEEK_STATE, bus_keys.PEEK_GRANT, bus_keys.INDICATOR_REPORTS) == ("p:state", "p:grant", "i:reports")
    assert bus_keys.sequence_counter("ch_1") == "seq:ch_1"
    assert bus_keys.heartbeat("i1") == "proc:i1"
    assert bus_keys.membership_version("ch_1") == "mv:ch_1"
    assert bus_keys.quota_window("creations", "agent:" + DID, 7) == f"quota:creations:agent:{DID}:7"
    assert bus_keys.INDICATOR_LISTING == "i:listing"
    assert bus_keys.send_claim("ch_1", DID, "c1") == f"cid:ch_1:{DID}:c1"
    assert bus_keys.indicator_counter("ch_1") == "ind:ch_1"
    assert bus_keys.indicator_recount_lock("ch_1") == "ind-recount:ch_1"
    assert bus_keys.wal_index("ch_1") == "wal:ch_1"
    assert (bus_keys.WAL_STATE_INDEX, bus_keys.WAL_COMPLETE, bus_keys.wal_reindexed("i1")) == ("wal-state", "complete", "idx:i1")
    assert bus_keys.auth_challenge("n1") == "challenge:n1"
    assert bus_keys.retention_lease() == "retention-lease"
    assert bus_keys.rate_window("send", "127.0.0.1", 5) == "rl:send:127.0.0.1:5"
    assert bus_keys.registration_used("ab12") == "registered:ab12"
    assert (bus_keys.REDIS_SEQUENCE, bus_keys.REDIS_VALUE, bus_keys.REDIS_INDEX, bus_keys.REDIS_TOPIC) == ("seq:", "kv:", "ix:", "t:")


def test_every_topic_kind_is_distinct_and_two_characters() -> None:
    kinds = [bus_keys.MESSAGES, bus_keys.CHANNEL_EVENTS, bus_keys.AGENT_EVENTS, bus_keys.PEEKS, bus_keys.INDICATORS]
    assert len(set(kinds)) == len(kinds) and {len(k) for k in kinds} == {bus_keys.KIND_LENGTH}
