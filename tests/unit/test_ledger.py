"""The money split and the double-entry ledger: integer cents, deterministic, always balanced."""

from __future__ import annotations

import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agentchat.core.ledger import (
    EXTERNAL,
    PLATFORM,
    Entry,
    EntryKind,
    Ledger,
    LedgerError,
    FeeSource,
    agent_account,
    payout_entries,
    refusal_fee_entries,
    refusal_fee_source,
    reversal_entries,
    split_amount,
    split_capture,
)

A, B, C = "did:agentchat:zA", "did:agentchat:zB", "did:agentchat:zC"

amounts = st.integers(min_value=0, max_value=10**7)
member_lists = st.lists(st.text(min_size=1, max_size=24), min_size=1, max_size=256, unique=True)


# --- the split --------------------------------------------------------------------------------------


def test_a_peek_price_among_three_members() -> None:
    assert split_amount(500, [C, A, B]) == {
        PLATFORM: 150,
        agent_account(A): 117,
        agent_account(B): 117,
        agent_account(C): 116,
    }


def test_a_single_member_gets_the_whole_agents_share() -> None:
    assert split_amount(500, [A]) == {PLATFORM: 150, agent_account(A): 350}


def test_the_platform_share_rounds_down() -> None:
    assert split_amount(7, [A])[PLATFORM] == 2  # 2.1 cents
    assert split_amount(3, [A])[PLATFORM] == 0  # 0.9 cents
    assert split_amount(500, [A], platform_share_bps=0) == {PLATFORM: 0, agent_account(A): 500}
    assert split_amount(500, [A], platform_share_bps=10_000) == {PLATFORM: 500, agent_account(A): 0}


@settings(max_examples=300)
@given(amount=amounts, members=member_lists, bps=st.integers(0, 10_000))
def test_split_properties(amount: int, members: list[str], bps: int) -> None:
    shares = split_amount(amount, members, platform_share_bps=bps)
    assert sum(shares.values()) == amount
    assert all(type(cents) is int and cents >= 0 for cents in shares.values())
    assert shares[PLATFORM] == amount * bps // 10_000
    agent_shares = [shares[agent_account(did)] for did in sorted(members)]
    assert len(agent_shares) == len(members)
    assert max(agent_shares) - min(agent_shares) <= 1
    # The extra cents go to the first members in DID order.
    assert agent_shares == sorted(agent_shares, reverse=True)


@given(amount=amounts, members=member_lists, seed=st.integers())
def test_split_does_not_depend_on_member_order(amount: int, members: list[str], seed: int) -> None:
    shuffled = list(members)
    random.Random(seed).shuffle(shuffled)
    assert list(split_amount(amount, members).items()) == list(split_amount(amount, shuffled).items())
    assert split_capture("pk_1", amount, members, created_at=1.0) == split_capture(
        "pk_1", amount, shuffled, created_at=1.0
    )


@given(amount=amounts, members=member_lists)
def test_capture_transaction_balances(amount: int, members: list[str]) -> None:
    entries = split_capture("pk_1", amount, members, created_at=1.0)
    assert sum(e.amount_cents for e in entries) == 0
    assert sum(e.amount_cents for e in entries if e.account != EXTERNAL) == amount
    assert all(e.amount_cents != 0 for e in entries)
    assert len({e.entry_id for e in entries}) == len(entries)
    ledger = Ledger(entries)
    ledger.check_balanced()
    assert ledger.balance(EXTERNAL) == -amount


def test_capture_entries_are_named_after_the_peek() -> None:
    entries = split_capture("pk_1", 500, [B, A], created_at=10.0)
    assert [(e.entry_id, e.amount_cents) for e in entries] == [
        ("capture/pk_1/external:payments", -500),
        ("capture/pk_1/platform", 150),
        (f"capture/pk_1/agent:{A}", 175),
        (f"capture/pk_1/agent:{B}", 175),
    ]
    assert {(e.kind, e.peek_id, e.payout_id, e.created_at) for e in entries} == {
        (EntryKind.CAPTURE, "pk_1", None, 10.0)
    }


@pytest.mark.parametrize(
    "call",
    [
        lambda: split_amount(500.0, [A]),  # type: ignore[arg-type]
        lambda: split_amount(True, [A]),
        lambda: split_amount(500, [A], platform_share_bps=30.0),  # type: ignore[arg-type]
        lambda: refusal_fee_entries("pk_1", A, 1.0, created_at=1.0),  # type: ignore[arg-type]
        lambda: payout_entries("po_1", A, False, created_at=1.0),
        lambda: Entry(PLATFORM, 1.5, EntryKind.CAPTURE, 1.0, peek_id="pk_1"),  # type: ignore[arg-type]
        lambda: Entry(PLATFORM, True, EntryKind.CAPTURE, 1.0, peek_id="pk_1"),
    ],
)
def test_money_is_int_only(call: object) -> None:
    with pytest.raises(TypeError):
        call()  # type: ignore[operator]


@pytest.mark.parametrize(
    "call",
    [
        lambda: split_amount(-1, [A]),
        lambda: split_amount(500, []),
        lambda: split_amount(500, [A, A]),
        lambda: split_amount(500, [A], platform_share_bps=10_001),
        lambda: payout_entries("po_1", A, 0, created_at=1.0),
        lambda: Entry("bank", 1, EntryKind.CAPTURE, 1.0, peek_id="pk_1"),
        lambda: Entry("agent:", 1, EntryKind.CAPTURE, 1.0, peek_id="pk_1"),
        lambda: Entry(PLATFORM, 1, EntryKind.CAPTURE, 1.0),
        lambda: Entry(PLATFORM, 1, EntryKind.PAYOUT, 1.0, peek_id="pk_1"),
        lambda: Entry(PLATFORM, 1, EntryKind.CAPTURE, 1.0, peek_id="pk_1", payout_id="po_1"),
    ],
)
def test_nonsense_is_rejected(call: object) -> None:
    with pytest.raises(ValueError):
        call()  # type: ignore[operator]


# --- refusal fees and payouts -----------------------------------------------------------------------


def test_a_refusal_costs_the_agent_and_credits_the_platform() -> None:
    ledger = Ledger(refusal_fee_entries("pk_1", A, 100, created_at=1.0))
    assert ledger.balances() == {agent_account(A): -100, PLATFORM: 100}
    assert [e.entry_id for e in ledger] == [f"refusal_fee/pk_1/agent:{A}", "refusal_fee/pk_1/platform"]


def test_a_zero_refusal_fee_records_nothing() -> None:
    assert refusal_fee_entries("pk_1", A, 0, created_at=1.0) == []


def test_a_payout_moves_an_agents_balance_out() -> None:
    ledger = Ledger(split_capture("pk_1", 500, [A], created_at=1.0))
    ledger.append(payout_entries("po_1", A, 350, created_at=2.0))
    assert ledger.balance(agent_account(A)) == 0
    assert ledger.balance(EXTERNAL) == -150  # what the platform still holds
    assert ledger.transaction("payout/po_1")[0].payout_id == "po_1"


# --- the ledger -------------------------------------------------------------------------------------


def test_replaying_a_transaction_is_a_no_op() -> None:
    ledger = Ledger()
    first = split_capture("pk_1", 500, [A, B], created_at=1.0)
    assert ledger.append(first) == first
    # The same effect executed again after a crash, later: recognised by entry id.
    assert ledger.append(split_capture("pk_1", 500, [A, B], created_at=99.0)) == []
    assert list(ledger) == first
    assert ledger.balance(PLATFORM) == 150


def test_replaying_with_other_amounts_is_refused_and_records_nothing() -> None:
    ledger = Ledger(split_capture("pk_1", 500, [A, B], created_at=1.0))
    before = list(ledger)
    fee = refusal_fee_entries("pk_2", C, 100, created_at=2.0)
    with pytest.raises(LedgerError, match="other amounts"):
        ledger.append(fee + split_capture("pk_1", 500, [A, B, C], created_at=2.0))
    assert list(ledger) == before  # all or nothing: the valid fee was not recorded either


def test_an_unbalanced_transaction_is_refused() -> None:
    ledger = Ledger()
    with pytest.raises(LedgerError, match="does not balance"):
        ledger.append(split_capture("pk_1", 500, [A], created_at=1.0)[1:])
    assert len(ledger) == 0
    assert ledger.balances() == {}


def test_an_account_twice_in_a_transaction_is_refused() -> None:
    twice = [
        Entry(PLATFORM, 5, EntryKind.CAPTURE, 1.0, peek_id="pk_1"),
        Entry(PLATFORM, -5, EntryKind.CAPTURE, 1.0, peek_id="pk_1"),
    ]
    with pytest.raises(LedgerError, match="twice"):
        Ledger(twice)


def test_only_entries_can_be_appended() -> None:
    with pytest.raises(TypeError):
        Ledger().append([("platform", 5)])  # type: ignore[list-item]


dids = st.text(min_size=1, max_size=8)
operations = st.lists(
    st.one_of(
        st.tuples(st.just("capture"), st.integers(0, 99), amounts, member_lists.map(lambda m: m[:8])),
        st.tuples(st.just("fee"), st.integers(0, 99), st.integers(0, 10_000), dids),
        st.tuples(st.just("payout"), st.integers(0, 99), st.integers(1, 10**6), dids),
        st.tuples(st.just("reversal"), st.integers(0, 99), st.just(0), st.just(None)),
    ),
    max_size=40,
)


@settings(max_examples=200)
@given(ops=operations)
def test_the_ledger_always_balances(ops: list[tuple[str, int, int, object]]) -> None:
    ledger = Ledger()
    seen: dict[str, list[Entry]] = {}
    for kind, ref, amount, who in ops:
        if kind == "capture":
            entries = split_capture(f"pk_{ref}", amount, who, created_at=1.0)  # type: ignore[arg-type]
        elif kind == "fee":
            entries = refusal_fee_entries(f"pk_{ref}", who, amount, created_at=1.0)  # type: ignore[arg-type]
        elif kind == "reversal":  # a refund at the provider undoes a recorded capture, if there is one
            entries = reversal_entries(ledger.transaction(f"capture/pk_{ref}"), created_at=2.0)
        else:
            entries = payout_entries(f"po_{ref}", who, amount, created_at=1.0)  # type: ignore[arg-type]
        txn = entries[0].txn_id if entries else None
        if txn is not None and txn in seen and _amounts(seen[txn]) != _amounts(entries):
            with pytest.raises(LedgerError):
                ledger.append(entries)
        else:
            ledger.append(entries)
            if txn is not None:
                seen.setdefault(txn, entries)
        ledger.check_balanced()
        assert sum(ledger.balances().values()) == 0
    # Balances are exactly the sums of the first recording of each transaction.
    expected: dict[str, int] = {}
    for entries in seen.values():
        for entry in entries:
            expected[entry.account] = expected.get(entry.account, 0) + entry.amount_cents
    assert ledger.balances() == expected
    assert len(ledger) == sum(len(entries) for entries in seen.values())


def _amounts(entries: list[Entry]) -> dict[str, int]:
    return {e.entry_id: e.amount_cents for e in entries}


# --- reversals, debts and fixed shares ---------------------------------------------------------------


@given(amount=amounts, members=member_lists)
def test_a_reversal_undoes_a_capture_and_only_once(amount: int, members: list[str]) -> None:
    ledger = Ledger(split_capture("pk_1", amount, members, created_at=1.0))
    reversal = reversal_entries(ledger.transaction("capture/pk_1"), created_at=2.0)
    ledger.append(reversal)
    ledger.append(reversal)  # a replayed refund event
    ledger.check_balanced()
    assert all(balance == 0 for balance in ledger.balances().values())
    assert {e.txn_id for e in reversal} <= {"reversal/pk_1"}
    if reversal:
        changed = [Entry(e.account, e.amount_cents + (1 if i == 0 else -1), e.kind, e.created_at, peek_id=e.peek_id)
                   for i, e in enumerate(reversal)]
        if len(changed) > 1:
            with pytest.raises(LedgerError):  # the same reversal with other amounts
                ledger.append(changed)


def test_a_reversal_takes_only_one_captures_entries() -> None:
    with pytest.raises(ValueError):
        reversal_entries(refusal_fee_entries("pk_1", A, 100, created_at=1.0), created_at=2.0)
    with pytest.raises(ValueError):
        reversal_entries([*split_capture("pk_1", 500, [A], created_at=1.0),
                          *split_capture("pk_2", 500, [A], created_at=1.0)], created_at=2.0)


def test_who_pays_a_refusal() -> None:
    assert refusal_fee_source(100, 100, has_card=False, debt_limit_cents=0) is FeeSource.EARNINGS
    assert refusal_fee_source(99, 100, has_card=True, debt_limit_cents=300) is FeeSource.CARD
    assert refusal_fee_source(-200, 100, has_card=False, debt_limit_cents=300) is FeeSource.DEBT
    assert refusal_fee_source(-201, 100, has_card=False, debt_limit_cents=300) is None
    assert refusal_fee_source(0, 100, has_card=False, debt_limit_cents=0) is None
    with pytest.raises(TypeError):
        refusal_fee_source(0, 1.0, has_card=False, debt_limit_cents=0)  # type: ignore[arg-type]


@settings(max_examples=200)
@given(limit=st.integers(0, 1_000), fee=st.integers(1, 300), card=st.booleans(),
       ops=st.lists(st.one_of(st.tuples(st.just("refuse"), st.integers(0, 0)),
                              st.tuples(st.just("earn"), st.integers(1, 2_000))), max_size=40))
def test_debts_stay_within_the_limit_and_later_earnings_pay_them_first(
        limit: int, fee: int, card: bool, ops: list[tuple[str, int]]) -> None:
    """One agent refusing and earning: a refusal is funded (earnings, card, or debt within the limit)
    or unfunded, never silently half-done; a debt never passes the limit; a later share goes first to
    the debt (the balance simply rises by it); the ledger balances throughout."""
    ledger = Ledger()
    account = agent_account(A)
    for n, (kind, amount) in enumerate(ops):
        before = ledger.balance(account)
        if kind == "earn":
            ledger.append(split_capture(f"pk_{n}", amount, [A], created_at=float(n)))
            assert ledger.balance(account) == before + split_amount(amount, [A])[account]
        else:
            source = refusal_fee_source(before, fee, has_card=card, debt_limit_cents=limit)
            if source is None:
                assert not card and before - fee < -limit
                continue
            if source is FeeSource.CARD:  # the card pays: the money comes from outside the ledger
                ledger.append([Entry(EXTERNAL, -fee, EntryKind.REFUSAL_FEE, float(n), peek_id=f"pk_{n}"),
                               Entry(PLATFORM, fee, EntryKind.REFUSAL_FEE, float(n), peek_id=f"pk_{n}")])
                assert ledger.balance(account) == before
            else:
                ledger.append(refusal_fee_entries(f"pk_{n}", A, fee, created_at=float(n)))
                assert ledger.balance(account) == before - fee
        assert ledger.balance(account) >= -limit
        ledger.check_balanced()
        assert sum(ledger.balances().values()) == 0


@given(at_start=member_lists.map(lambda m: m[:6]), joined=member_lists.map(lambda m: m[:6]),
       amount=st.integers(0, 10_000))
def test_shares_go_to_the_members_of_the_countdowns_start(at_start: list[str], joined: list[str], amount: int) -> None:
    """Whoever joins or leaves after the countdown starts, the capture is split among the members the
    peek recorded then: joiners get nothing, leavers keep their share, and the split balances."""
    from agentchat.core.peek import CaptureSucceeded, DeadlineReached, KeyGranted, PaymentAuthorized, open_peek, step

    peek = open_peek("pk_1", "ch_1", "key", 0.0, price_cents=amount).peek
    peek = step(peek, PaymentAuthorized("pi_1", tuple(at_start)), 1.0).peek
    peek = step(peek, DeadlineReached(), 61.0).peek
    peek = step(peek, KeyGranted(at_start[0]), 62.0).peek
    split = step(peek, CaptureSucceeded(), 63.0).effects[0]
    assert split.members == tuple(sorted(at_start))  # type: ignore[union-attr]
    ledger = Ledger(split_capture("pk_1", amount, split.members, created_at=63.0))  # type: ignore[union-attr,arg-type]
    ledger.check_balanced()
    assert sum(ledger.balances().values()) == 0
    for did in set(joined) - set(at_start):
        assert ledger.balance(agent_account(did)) == 0
    shares = [ledger.balance(agent_account(did)) for did in at_start]
    assert max(shares) - min(shares) <= 1
