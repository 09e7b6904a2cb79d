"""The durable ledger (``payments/ledger.py``) on the directory store, against the in-memory model of
``core/ledger.py``: any sequence of captures, refusal fees, replays and concurrent duplicates leaves
it balanced to the cent, with every account's index holding exactly its entries."""

from __future__ import annotations

import asyncio
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agentchat.core import ledger as money
from agentchat.payments.ledger import LedgerStore
from agentchat.store import keys as store_keys
from agentchat.store.instrumented import CountingStore
from agentchat.store.local import LocalStore

DIDS = [f"did:agentchat:z6Mk{letter * 44}" for letter in "abcd"]
PEEKS = [f"pk_{n:020d}" for n in range(5)]

capture = st.tuples(st.just("capture"), st.sampled_from(PEEKS),
                    st.lists(st.sampled_from(DIDS), min_size=1, max_size=4, unique=True))
fee = st.tuples(st.just("fee"), st.sampled_from(PEEKS), st.sampled_from(DIDS), st.booleans())
operations = st.lists(st.one_of(capture, fee, st.tuples(st.just("replay"), st.integers(0, 30)),
                                st.tuples(st.just("twice"), st.integers(0, 30))), min_size=1, max_size=20)


def entries_of(op: tuple[Any, ...]) -> list[money.Entry]:
    if op[0] == "capture":
        return money.split_capture(op[1], 500, op[2], created_at=1.0)
    _, peek, did, by_card = op
    if by_card:  # the fee came from the agent's card: from outside the ledger to the platform
        kind = money.EntryKind.REFUSAL_FEE
        return [money.Entry(money.EXTERNAL, -100, kind, 2.0, peek_id=peek),
                money.Entry(money.PLATFORM, 100, kind, 2.0, peek_id=peek)]
    return money.refusal_fee_entries(peek, did, 100, created_at=2.0)


async def run(ops: list[tuple[Any, ...]], root: Path) -> None:
    store = LocalStore(str(root))
    await store.start()
    durable, model = LedgerStore(store), money.Ledger()
    done: list[list[money.Entry]] = []
    try:
        for op in ops:
            if op[0] in ("replay", "twice"):
                if not done:
                    continue
                batch = done[op[1] % len(done)]
            else:
                batch = entries_of(op)
            try:
                model.append(batch)
                expected_error = None
            except money.LedgerError as exc:
                expected_error = exc
            attempts = 2 if op[0] == "twice" else 1
            results = await asyncio.gather(*(durable.record(batch) for _ in range(attempts)), return_exceptions=True)
            for result in results:
                assert isinstance(result, money.LedgerError) == (expected_error is not None), (op, result)
            if expected_error is None:
                done.append(batch)
                if attempts == 2:  # of two concurrent records of a new transaction, one added it
                    assert sum(bool(r) for r in results) <= 1
        audited = await durable.audit()
        assert audited.balances() == model.balances()
        assert len(audited) == len(model)
        assert sum(audited.balances().values()) == 0
        for account in {e.account for e in model}:
            indexed = await durable.entries(account)
            assert sorted(e.entry_id for e in indexed) == sorted(e.entry_id for e in model if e.account == account)
            assert sum(e.amount_cents for e in indexed) == model.balance(account) == await durable.balance(account)
    finally:
        await store.close()


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(ops=operations)
def test_any_sequence_of_payments_keeps_the_stored_ledger_balanced(tmp_path_factory: pytest.TempPathFactory,
                                                                   ops: list[tuple[Any, ...]]) -> None:
    asyncio.run(run(ops, tmp_path_factory.mktemp("ledger")))


async def test_a_transaction_recorded_again_with_other_amounts_is_refused(tmp_path: Path) -> None:
    store = LocalStore(str(tmp_path))
    await store.start()
    try:
        durable = LedgerStore(store)
        first = money.split_capture(PEEKS[0], 500, DIDS[:2], created_at=1.0)
        assert len(await durable.record(first)) == 4
        assert await durable.record(first) == []  # a replay adds nothing
        with pytest.raises(money.LedgerError):
            await durable.record(money.split_capture(PEEKS[0], 500, DIDS[:3], created_at=1.0))
        with pytest.raises(money.LedgerError):  # does not sum to zero: nothing is written
            await durable.record([money.Entry(money.PLATFORM, 5, money.EntryKind.CAPTURE, 1.0, peek_id=PEEKS[1])])
        assert await durable.transaction(f"capture/{PEEKS[1]}") == []
        assert await durable.balance(money.PLATFORM) == 150
    finally:
        await store.close()


async def test_a_replay_writes_only_the_index_entries_a_crash_left_out(tmp_path: Path) -> None:
    ops: Counter[str] = Counter()
    store = CountingStore(LocalStore(str(tmp_path)), ops, Counter())
    await store.start()
    try:
        durable = LedgerStore(store)
        entries = money.split_capture(PEEKS[0], 500, DIDS[:3], created_at=1.0)
        await durable.record(entries)
        lost = entries[1]
        await store.delete(store_keys.ledger_entry(lost.account, lost.txn_id))  # as if the process died before writing it
        ops.clear()
        assert await durable.record(entries) == []
        assert ops["put"] == 2  # the transaction's create-if-absent (refused) and the missing entry
        assert [e.entry_id for e in await durable.entries(lost.account)] == [lost.entry_id]
        ops.clear()
        await durable.record(entries)
        assert ops["put"] == 1  # the index is whole: nothing but the transaction's attempt
        assert await durable.balance(money.PLATFORM) == 150
    finally:
        await store.close()
