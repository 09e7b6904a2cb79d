"""The money ledger, sans I/O: append-only, double-entry, integer cents.

Every movement of money is a *transaction*: a set of entries on different accounts that sum to zero.

- ``platform``: the platform's revenue.
- ``agent:<did>``: what the platform owes an agent. It may go negative (an agent that refuses a peek
  before earning anything owes the fee); a negative balance is settled out of later shares.
- ``external:payments``: money outside the ledger, at the payment provider. A capture comes from it
  (a debit), a payout goes back to it (a credit), so its balance is minus what the platform holds.

Transactions, each identified by kind and what caused it (``txn_id``)::

    capture/<peek id>       external -price, platform +30 %, each member of the channel an equal part of
                            the remaining 70 % (remainder cents to the first members in DID order)
    refusal_fee/<peek id>   agent:<refusing did> -fee, platform +fee (the peeker is not charged)
    reversal/<peek id>      the capture's entries negated: the money went back to the peeker (a refund
                            at the payment provider); a member's share taken back may leave a debt
    payout/<payout id>      agent:<did> -amount, external +amount

Entry ids are ``<txn_id>/<account>``, so replaying a transaction (an effect executed again after a
crash) is recognised and ignored, however late it comes. Amounts are ``int``; a ``float`` or ``bool``
is a ``TypeError``.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from enum import StrEnum

PLATFORM = "platform"
EXTERNAL = "external:payments"
AGENT_PREFIX = "agent:"
PLATFORM_SHARE_BPS = 3000  # 30 %, in basis points
_BPS = 10_000


class LedgerError(ValueError):
    """An append that would break the ledger: unbalanced, or a replay with different amounts."""


class EntryKind(StrEnum):
    CAPTURE = "capture"
    REFUSAL_FEE = "refusal_fee"
    REVERSAL = "reversal"
    PAYOUT = "payout"


def agent_account(did: str) -> str:
    if not isinstance(did, str) or not did:
        raise ValueError(f"an agent's DID must be a non-empty string, got {did!r}")
    return AGENT_PREFIX + did


@dataclass(frozen=True, slots=True)
class Entry:
    """One line of the ledger: ``amount_cents`` (signed) on ``account``.

    Exactly one of ``peek_id`` (captures, refusal fees) and ``payout_id`` (payouts) is set.
    """

    account: str
    amount_cents: int
    kind: EntryKind
    created_at: float
    peek_id: str | None = None
    payout_id: str | None = None

    def __post_init__(self) -> None:
        _require_cents("amount_cents", self.amount_cents, signed=True)
        object.__setattr__(self, "kind", EntryKind(self.kind))
        if type(self.created_at) not in (int, float):
            raise TypeError(f"created_at must be a number of seconds, got {type(self.created_at).__name__}")
        object.__setattr__(self, "created_at", float(self.created_at))
        is_agent = isinstance(self.account, str) and self.account.startswith(AGENT_PREFIX)
        if self.account not in (PLATFORM, EXTERNAL) and not (is_agent and self.account != AGENT_PREFIX):
            raise ValueError(f"unknown account {self.account!r}")
        expects_payout = self.kind is EntryKind.PAYOUT
        ref, other = (self.payout_id, self.peek_id) if expects_payout else (self.peek_id, self.payout_id)
        if not isinstance(ref, str) or not ref or other is not None:
            wanted = "payout_id" if expects_payout else "peek_id"
            raise ValueError(f"a {self.kind} entry needs {wanted} and only it")

    @property
    def txn_id(self) -> str:
        return f"{self.kind}/{self.peek_id or self.payout_id}"

    @property
    def entry_id(self) -> str:
        return f"{self.txn_id}/{self.account}"


def _require_cents(name: str, value: object, *, signed: bool = False) -> None:
    if type(value) is not int:  # rejects bool and float: money is whole cents
        raise TypeError(f"{name} must be an int number of cents, got {type(value).__name__}")
    if not signed and value < 0:
        raise ValueError(f"{name} must not be negative, got {value}")


# --- building transactions --------------------------------------------------------------------------


def split_amount(
    amount_cents: int, member_dids: Iterable[str], platform_share_bps: int = PLATFORM_SHARE_BPS
) -> dict[str, int]:
    """Account -> cents for a captured amount: ``platform`` first, then each member in DID order.

    The platform's share is rounded down (150 of 500); the rest is split equally among the members,
    and its remainder cents go one each to the first members in DID order (sorted by code point). The
    shares always sum to ``amount_cents``, two members' shares differ by at most one cent, and the
    result does not depend on the order of ``member_dids``.
    """
    _require_cents("amount_cents", amount_cents)
    _require_cents("platform_share_bps", platform_share_bps)
    if platform_share_bps > _BPS:
        raise ValueError(f"platform_share_bps must be at most {_BPS}, got {platform_share_bps}")
    members = sorted(member_dids)
    if not members:
        raise ValueError("a capture is split among at least one member")
    if len(set(members)) != len(members):
        raise ValueError("member DIDs must be distinct")
    platform = amount_cents * platform_share_bps // _BPS
    each, remainder = divmod(amount_cents - platform, len(members))
    shares = {PLATFORM: platform}
    for index, did in enumerate(members):
        shares[agent_account(did)] = each + (1 if index < remainder else 0)
    return shares


def split_capture(
    peek_id: str,
    amount_cents: int,
    member_dids: Iterable[str],
    *,
    created_at: float,
    platform_share_bps: int = PLATFORM_SHARE_BPS,
) -> list[Entry]:
    """The capture transaction of a peek: ``external`` debited ``amount_cents``, then the credits of
    ``split_amount`` (which sum to ``amount_cents``). Accounts whose share is 0 get no entry."""
    shares = split_amount(amount_cents, member_dids, platform_share_bps)
    kind = EntryKind.CAPTURE
    lines = [(EXTERNAL, -amount_cents), *shares.items()]
    return [Entry(account, cents, kind, created_at, peek_id=peek_id) for account, cents in lines if cents]


def refusal_fee_entries(peek_id: str, agent_did: str, fee_cents: int, *, created_at: float) -> list[Entry]:
    """The refusing agent pays ``fee_cents`` to the platform (nothing if the fee is 0)."""
    _require_cents("fee_cents", fee_cents)
    if not fee_cents:
        return []
    kind = EntryKind.REFUSAL_FEE
    return [
        Entry(agent_account(agent_did), -fee_cents, kind, created_at, peek_id=peek_id),
        Entry(PLATFORM, fee_cents, kind, created_at, peek_id=peek_id),
    ]


def reversal_entries(capture: Iterable[Entry], *, created_at: float) -> list[Entry]:
    """The capture transaction ``capture`` undone: every entry negated, under ``reversal/<peek id>``.
    Sums to zero because the capture does; an empty capture reverses to nothing."""
    lines = list(capture)
    if any(e.kind is not EntryKind.CAPTURE for e in lines) or len({e.peek_id for e in lines}) > 1:
        raise ValueError("a reversal undoes exactly one peek's capture transaction")
    kind = EntryKind.REVERSAL
    return [Entry(e.account, -e.amount_cents, kind, created_at, peek_id=e.peek_id) for e in lines]


class FeeSource(StrEnum):
    """Where a refusal fee comes from (protocol/peek.md, "An agent's no always counts")."""

    EARNINGS = "earnings"
    CARD = "card"
    DEBT = "debt"


def refusal_fee_source(available_cents: int, fee_cents: int, *, has_card: bool,
                       debt_limit_cents: int) -> FeeSource | None:
    """Who pays the next refusal: the earnings not set aside if they cover the fee, else the card on
    file, else a debt if the balance stays at or above ``-debt_limit_cents``; None: unfunded (the
    refusal would be rejected, which the agent is told in advance)."""
    for name, value in (("available_cents", available_cents), ("fee_cents", fee_cents),
                        ("debt_limit_cents", debt_limit_cents)):
        _require_cents(name, value, signed=name == "available_cents")
    if available_cents >= fee_cents:
        return FeeSource.EARNINGS
    if has_card:
        return FeeSource.CARD
    if available_cents - fee_cents >= -debt_limit_cents:
        return FeeSource.DEBT
    return None


def payout_entries(payout_id: str, agent_did: str, amount_cents: int, *, created_at: float) -> list[Entry]:
    """``amount_cents`` of an agent's balance paid out to it through the payment provider."""
    _require_cents("amount_cents", amount_cents)
    if not amount_cents:
        raise ValueError("a payout must move money")
    kind = EntryKind.PAYOUT
    return [
        Entry(agent_account(agent_did), -amount_cents, kind, created_at, payout_id=payout_id),
        Entry(EXTERNAL, amount_cents, kind, created_at, payout_id=payout_id),
    ]


# --- the ledger -------------------------------------------------------------------------------------


class Ledger:
    """An in-memory, append-only ledger. The I/O layer stores transactions and rebuilds one of these
    from them; it holds no clock and does no I/O."""

    def __init__(self, entries: Iterable[Entry] = ()) -> None:
        self._entries: list[Entry] = []
        self._by_txn: dict[str, dict[str, Entry]] = {}  # txn_id -> entry_id -> entry
        self._balances: defaultdict[str, int] = defaultdict(int)
        self.append(entries)

    def append(self, entries: Iterable[Entry]) -> list[Entry]:
        """Record whole transactions; returns the entries that were new.

        All or nothing: raises ``LedgerError`` and records nothing if a transaction in ``entries``
        does not sum to zero, names an account twice, or was recorded before with different entries.
        A transaction recorded before with the same accounts and amounts is a replay and is skipped
        (the first ``created_at`` stays).
        """
        batch: dict[str, dict[str, Entry]] = {}
        for entry in entries:
            if not isinstance(entry, Entry):
                raise TypeError(f"expected an Entry, got {type(entry).__name__}")
            lines = batch.setdefault(entry.txn_id, {})
            if entry.entry_id in lines:
                raise LedgerError(f"transaction {entry.txn_id} names {entry.account} twice")
            lines[entry.entry_id] = entry
        for txn_id, lines in batch.items():
            total = sum(e.amount_cents for e in lines.values())
            if total:
                raise LedgerError(f"transaction {txn_id} does not balance: its entries sum to {total}")
            recorded = self._by_txn.get(txn_id)
            if recorded is not None and _amounts(recorded) != _amounts(lines):
                raise LedgerError(f"transaction {txn_id} was already recorded with other amounts")
        added: list[Entry] = []
        for txn_id, lines in batch.items():
            if txn_id in self._by_txn:
                continue
            self._by_txn[txn_id] = lines
            for entry in lines.values():
                self._entries.append(entry)
                self._balances[entry.account] += entry.amount_cents
                added.append(entry)
        return added

    def balance(self, account: str) -> int:
        return self._balances.get(account, 0)

    def balances(self) -> dict[str, int]:
        """Every account that has entries, with its balance in cents."""
        return dict(self._balances)

    def transaction(self, txn_id: str) -> list[Entry]:
        return list(self._by_txn.get(txn_id, {}).values())

    def __iter__(self) -> Iterator[Entry]:
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)

    def check_balanced(self) -> None:
        """Audit: every transaction sums to zero and the balances agree with the entries.

        ``append`` keeps both true; this recomputes them from the entries and raises ``LedgerError`` if
        they do not hold, for use after loading or in tests.
        """
        recomputed: defaultdict[str, int] = defaultdict(int)
        for txn_id, lines in self._by_txn.items():
            total = sum(e.amount_cents for e in lines.values())
            if total:
                raise LedgerError(f"transaction {txn_id} does not balance: its entries sum to {total}")
        for entry in self._entries:
            recomputed[entry.account] += entry.amount_cents
        if dict(recomputed) != dict(self._balances):
            raise LedgerError("account balances do not match the entries")


def _amounts(lines: dict[str, Entry]) -> dict[str, int]:
    return {entry_id: entry.amount_cents for entry_id, entry in lines.items()}

