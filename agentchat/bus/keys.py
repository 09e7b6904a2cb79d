"""Every topic and key the product gives the bus, in one place (object-store keys are in
``agentchat/store/keys.py``).

A topic starts with a two-character kind (``c:``, ``e:``, ``a:``, ``p:``, ``i:``): the hub reads the
kind to route a message to its readers without parsing the rest. Keys name counters, claims, locks and
indexes; the Redis bus prefixes each with its namespace and a family (``REDIS_*`` below), so two
deployments can share one Redis and a topic never collides with a key.

These strings are a shared layout: every process of a deployment must agree on them, and a Redis that
outlives an upgrade still holds counters and indexes under them.
"""

from __future__ import annotations

# -- topics ------------------------------------------------------------------------------------------

MESSAGES = "c:"  # + channel id: the channel's sequenced messages
CHANNEL_EVENTS = "e:"  # + channel id: membership and epoch changes, peek endings
AGENT_EVENTS = "a:"  # + DID: an agent's own events (added to a channel, ...)
PEEKS = "p:"  # the peek service's topics
INDICATORS = "i:"  # the public indicators' topics
KIND_LENGTH = 2

PEEK_STATE = PEEKS + "state"  # a peek's new state (every process drives its timers)
PEEK_GRANT = PEEKS + "grant"  # an epoch key wrapped for a peeker
INDICATOR_REPORTS = INDICATORS + "reports"  # each process's per-second counts
INDICATOR_LISTING = INDICATORS + "listing"  # a channel was listed or unlisted (body: its id)


def channel_messages(channel: str) -> str:
    return MESSAGES + channel


def channel_events(channel: str) -> str:
    return CHANNEL_EVENTS + channel


def agent_events(did: str) -> str:
    return AGENT_EVENTS + did


# -- keys ----------------------------------------------------------------------------------------------


def sequence_counter(channel: str) -> str:
    """A channel's message numbers (``publish_sequenced``); re-seeded from the store if lost."""
    return "seq:" + channel


def membership_version(channel: str) -> str:
    """The newest membership version of a channel any process wrote (a counter raised before the
    record is stored; server/membership.py); re-seeded from the store if lost."""
    return "mv:" + channel


def quota_window(kind: str, who: str, window: int) -> str:
    """Channel creations or invitations (``kind``) of one agent or address (``who``) in one hour."""
    return f"quota:{kind}:{who}:{window}"


def heartbeat(instance: str) -> str:
    """Present while the server process ``instance`` lives."""
    return "proc:" + instance


def send_claim(channel: str, sender: str, client_id: str) -> str:
    """A sender's client id on a channel: makes a resent message one message (client ids hold no colon)."""
    return f"cid:{channel}:{sender}:{client_id}"


def indicator_counter(channel: str) -> str:
    """A channel's shared activity counts (public indicators)."""
    return "ind:" + channel


def indicator_recount_lock(channel: str) -> str:
    """Held by the one process recounting a channel's activity from the store."""
    return "ind-recount:" + channel


def in_flight(channel: str, instance: str) -> str:
    """Index of the numbers of ``channel`` that process ``instance`` handed out and has not stored
    yet (member: the number; score: the number). Added in the same atomic bus step as the number
    (``claim_and_publish``), removed once the message is stored; what a dead process leaves here and
    never stored becomes a gap (``store/recovery.py``)."""
    return f"inflight:{channel}:{instance}"


# Index of the processes that may have in-flight numbers (member: the instance id), and per process the
# index of the channels it numbered messages of (member: the channel id). Written before the process's
# first number on a channel, so recovery finds every ``in_flight`` index of a dead process.
IN_FLIGHT_PROCESSES = "inflight-procs"


def in_flight_channels(instance: str) -> str:
    return "inflight-chans:" + instance


def wal_index(channel: str) -> str:
    """Index of the write-ahead objects holding a channel's not yet compacted messages."""
    return "wal:" + channel


# Index whose members say the ``wal:<channel>`` indexes are complete (``store/messages.py``): the
# member ``complete``, and ``idx:<instance>`` for each process that put its own entries in since.
WAL_STATE_INDEX = "wal-state"
WAL_COMPLETE = "complete"


def wal_reindexed(instance: str) -> str:
    """Member of ``WAL_STATE_INDEX``: ``instance`` put its own entries in the index (again)."""
    return "idx:" + instance


def retention_lease() -> str:
    """Held by the one process running the retention pass of the current period."""
    return "retention-lease"


def auth_challenge(nonce: str) -> str:
    """The DID a login challenge was issued to, until it is answered or expires."""
    return "challenge:" + nonce


UNPAID_PEEKS = "peeks-unpaid"  # index: peeks awaiting payment, scored by payment_expires_at (ms)


def unpaid_peeks(address_tag: str = "") -> str:
    """The index of peeks awaiting payment: all of them, or those opened from one address (by its tag)."""
    return f"{UNPAID_PEEKS}/{address_tag}" if address_tag else UNPAID_PEEKS
def registration_used(signature_digest: str) -> str:
    """A registration signature already accepted, for as long as its timestamp could still pass."""
    return "registered:" + signature_digest


def rate_window(bucket: str, address: str, window: int) -> str:
    """Requests of one client address in one second of one rate-limit bucket."""
    return f"rl:{bucket}:{address}:{window}"


# Topics and keys that belong to one channel: the channel id follows the prefix, up to the next colon.
# A Redis Cluster keeps each channel's names in one hash slot by this (``bus/redis_cluster.py``), so a
# send's claim, counter and topic must all name the same channel.
_CHANNEL_SCOPED = (MESSAGES, CHANNEL_EVENTS, "seq:", "cid:", "ind:", "ind-recount:", "wal:", "mv:", "inflight:")


def channel_scope(name: str) -> tuple[str, str, str] | None:
    """``(prefix, channel, rest)`` of a topic or key that belongs to one channel, else ``None``."""
    for prefix in _CHANNEL_SCOPED:
        if name.startswith(prefix):
            channel, colon, rest = name[len(prefix):].partition(":")
            if channel:
                return prefix, channel, colon + rest
    return None


# -- how the Redis bus lays these out --------------------------------------------------------------------
# Every name the Redis bus gives Redis is ``<namespace>:<family><topic or key>``:
REDIS_DEFAULT_NAMESPACE = "agentchat"
REDIS_SEQUENCE = "seq:"  # sequence counters; no expiry (re-seeded from the store if lost)
REDIS_VALUE = "kv:"  # set / set_if_absent / take / compare_and_set / incr; all expire
REDIS_INDEX = "ix:"  # sorted sets of index_add / index_range / index_remove; no expiry
REDIS_TOPIC = "t:"  # pub/sub channels
