"""Every object key the product writes, in one place (the seed's layout: agents/, channels/, messages/,
peeks/, plus ledger/, memberships/, the write-ahead batches under wal/ and the peek service's payment
records). Keys of the bus (Redis or in-process) are in ``agentchat/bus/keys.py``.

These strings are the stored layout: changing one orphans the data written under the old one.

Numbers are zero-padded so that byte order (the order S3 lists keys in) is numeric order.
"""

from __future__ import annotations

SEQ_WIDTH = 16
EPOCH_WIDTH = 10


AGENT_PREFIX = "agents/"
CHANNEL_PREFIX = "channels/"
SEGMENT_PREFIX = "messages/"
SERVER_PREFIX = "server/"


def agent(did: str) -> str:
    return f"agents/{did}.json"


def channel(channel_id: str) -> str:
    return f"channels/{channel_id}/meta.json"


def channel_prefix(channel_id: str) -> str:
    """A channel's record and epoch keys."""
    return f"channels/{channel_id}/"


def epoch(channel_id: str, number: int) -> str:
    return f"channels/{channel_id}/epochs/{number:0{EPOCH_WIDTH}d}.json"


def membership_prefix(did: str) -> str:
    return f"memberships/{did}/"


def membership(did: str, channel_id: str) -> str:
    return f"memberships/{did}/{channel_id}"


def invitation_prefix(did: str) -> str:
    return f"invitations/{did}/"


def invitation(did: str, channel_id: str) -> str:
    """Empty marker: the agent is invited to the channel and has not answered (lists its invitations)."""
    return f"invitations/{did}/{channel_id}"


def block_prefix(did: str) -> str:
    return f"blocks/{did}/"


def block(did: str, blocked: str) -> str:
    """Empty marker: ``did`` refuses every invitation from ``blocked``."""
    return f"blocks/{did}/{blocked}"


CHANNEL_INDEX_PREFIX = "channel-index/"


def channel_index(channel_id: str) -> str:
    """Empty marker listing every channel (public indicators walk it)."""
    return f"{CHANNEL_INDEX_PREFIX}{channel_id}"


def segment_prefix(channel_id: str) -> str:
    return f"messages/{channel_id}/"


def segment(channel_id: str, first_seq: int, last_seq: int) -> str:
    # Named by last then first: listing with start_after=segment_after(ch, n) yields exactly the
    # segments that can hold a number above n.
    return f"messages/{channel_id}/{last_seq:0{SEQ_WIDTH}d}-{first_seq:0{SEQ_WIDTH}d}.seg"


def segment_after(channel_id: str, seq: int) -> str:
    return f"messages/{channel_id}/{seq:0{SEQ_WIDTH}d}-{'9' * SEQ_WIDTH}.seg"


def parse_segment(key: str) -> tuple[int, int]:
    """(first, last) sequence numbers of a segment key."""
    name = key.rsplit("/", 1)[1].removesuffix(".seg")
    last, first = name.split("-")
    return int(first), int(last)


WAL_PREFIX = "wal/"


def wal_prefix(instance: str) -> str:
    return f"{WAL_PREFIX}{instance}/"


def wal(instance: str, number: int) -> str:
    """One flush of a server process: every channel's messages of that batch (store/messages.py)."""
    return f"{WAL_PREFIX}{instance}/{number:0{SEQ_WIDTH}d}.wal"


def parse_wal(key: str) -> tuple[str, int]:
    """(instance, number) of a write-ahead object key."""
    _, instance, name = key.split("/")
    return instance, int(name.removesuffix(".wal"))


def peek(peek_id: str) -> str:
    return f"peeks/{peek_id}.json"


def peek_index_prefix(channel_id: str = "") -> str:
    """Markers of one channel's peeks, or (no channel) of every channel's."""
    return f"peek-index/{channel_id}/" if channel_id else "peek-index/"


def peek_index(channel_id: str, peek_id: str) -> str:
    """Empty marker: this peek of the channel became active (public indicators count them)."""
    return f"peek-index/{channel_id}/{peek_id}"


PEEK_OPEN_PREFIX = "peeks-open/"


def peek_open(peek_id: str) -> str:
    """Empty marker written before the peek itself: the peek service's scan finds every open peek."""
    return PEEK_OPEN_PREFIX + peek_id


PEEK_DUE_PREFIX = "peeks-due/"
DUE_MS_WIDTH = 15


def peek_due(at_ms: int, peek_id: str) -> str:
    """Empty marker: the peek has something due at ``at_ms`` (ms since the epoch). Keys sort by time,
    so the scan lists from the start and stops at the first one not yet due."""
    return f"{PEEK_DUE_PREFIX}{max(0, at_ms):0{DUE_MS_WIDTH}d}/{peek_id}"


def parse_peek_due(key: str) -> tuple[int, str]:
    at, _, peek_id = key[len(PEEK_DUE_PREFIX):].partition("/")
    return int(at), peek_id


def peek_payment(peek_id: str) -> str:
    return f"peek-payments/{peek_id}.json"


def peek_refusal_prefix(peek_id: str) -> str:
    return f"peek-refusals/{peek_id}/"


def peek_refusal(peek_id: str, did: str) -> str:
    return f"{peek_refusal_prefix(peek_id)}{did}.json"


def peek_grant_prefix(peek_id: str) -> str:
    return f"peek-grants/{peek_id}/"


def peek_grant(peek_id: str, epoch: int) -> str:
    return f"{peek_grant_prefix(peek_id)}{epoch:0{EPOCH_WIDTH}d}.json"


def balance_holds(did: str) -> str:
    """What an agent's earnings balance holds back for refusal fees not yet charged."""
    return f"balance-holds/{did}.json"


def card(did: str) -> str:
    """An agent's card on file (the payment provider's reference, never the card number)."""
    return f"cards/{did}.json"


def peek_choice(did: str) -> str:
    """An agent's standing peek choice, ``allow`` or ``refuse``, applied when a countdown starts."""
    return f"peek-choices/{did}.json"


LEDGER_TXN_PREFIX = "ledger/txns/"
LEDGER_ACCOUNT_PREFIX = "ledger/accounts/"


def ledger_txn(txn_id: str) -> str:
    return f"{LEDGER_TXN_PREFIX}{txn_id}.json"


def ledger_account_prefix(account: str) -> str:
    return f"{LEDGER_ACCOUNT_PREFIX}{account}/"


def ledger_entry(account: str, txn_id: str) -> str:
    """One account's entry of a transaction (an account's entries are listed under its prefix)."""
    return ledger_account_prefix(account) + txn_id


RETENTION_INDEX_PREFIX = "retention-index/"


def retention_index(channel_id: str) -> str:
    """Empty marker: this channel has a retention of its own (the expiry pass walks these)."""
    return f"{RETENTION_INDEX_PREFIX}{channel_id}"


def channel_tombstone(channel_id: str) -> str:
    """Left when a channel is deleted: its id is never used again, and late writers see it is gone."""
    return f"tombstones/channels/{channel_id}"


def agent_tombstone(did: str) -> str:
    """Left when an agent deletes its account: the DID can never be registered again."""
    return f"tombstones/agents/{did}"


def server_secret() -> str:
    return "server/token-secret"


def clean_shutdown() -> str:
    """Present only between a clean stop of a single-process server and its next start."""
    return "server/clean-shutdown"
