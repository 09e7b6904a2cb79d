"""The durable ledger: ``core/ledger.py``'s transactions kept in the store, append-only.

Layout (one object per transaction, plus one per entry for reading an account)::

    ledger/txns/<txn id>.json                 {"txn": id, "entries": [...]}   e.g. ledger/txns/capture/pk_x.json
    ledger/accounts/<account>/<txn id>        the account's entry of that transaction

A transaction object is written create-if-absent: that write is the transaction, and it happens once
whatever number of processes or retries record it. Recording it again with the same amounts is a
no-op; with other amounts it is refused (``LedgerError``). The account objects are an index, written
after the transaction; a replay writes the ones that are missing, so a crash between the two is repaired
by recording the transaction again, which is what the peek service does for every effect it may have
cut short (on every process that finds the peek open: a replay that finds the index whole only reads).
Nothing is ever overwritten with other content or deleted.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable
from typing import Any

import orjson

from agentchat.core.ledger import Entry, EntryKind, Ledger, LedgerError
from agentchat.store import keys as store_keys
from agentchat.store.base import ObjectStore, PreconditionFailed

# Reading an account's entries: this many objects fetched at once.
READ_CONCURRENCY = 32


def entry_to_json(entry: Entry) -> dict[str, Any]:
    wire: dict[str, Any] = {"account": entry.account, "amount_cents": entry.amount_cents, "kind": str(entry.kind),
                            "created_at": entry.created_at, "txn": entry.txn_id}
    if entry.peek_id is not None:
        wire["peek_id"] = entry.peek_id
    if entry.payout_id is not None:
        wire["payout_id"] = entry.payout_id
    return wire


def entry_from_json(data: dict[str, Any]) -> Entry:
    return Entry(data["account"], data["amount_cents"], EntryKind(data["kind"]), data["created_at"],
                 peek_id=data.get("peek_id"), payout_id=data.get("payout_id"))


class LedgerStore:
    def __init__(self, store: ObjectStore) -> None:
        self.store = store

    async def record(self, entries: Iterable[Entry]) -> list[Entry]:
        """Record whole transactions (each must sum to zero); returns the entries that were new.

        Raises ``LedgerError`` if a transaction does not balance or was recorded before with other
        amounts; nothing of that transaction is written then.
        """
        check = Ledger()
        check.append(entries)  # validates every transaction before anything is written
        added: list[Entry] = []
        for txn_id in dict.fromkeys(entry.txn_id for entry in check):
            lines = check.transaction(txn_id)
            stored, new = await self._write_transaction(txn_id, lines)
            if new:
                added.extend(lines)
            else:  # a replay: only what a crash may have left out
                present = await asyncio.gather(*(self.store.get(store_keys.ledger_entry(e.account, e.txn_id)) for e in stored))
                stored = [e for e, found in zip(stored, present) if found is None]
            await asyncio.gather(*(self.store.put(store_keys.ledger_entry(e.account, e.txn_id), orjson.dumps(entry_to_json(e))) for e in stored))
        return added

    async def _write_transaction(self, txn_id: str, lines: list[Entry]) -> tuple[list[Entry], bool]:
        """Write the transaction unless it exists; (what is stored, whether this call stored it)."""
        body = orjson.dumps({"txn": txn_id, "entries": [entry_to_json(e) for e in lines]})
        try:
            await self.store.put(store_keys.ledger_txn(txn_id), body, if_none_match=True)
            return lines, True
        except PreconditionFailed:
            pass
        recorded = await self._recorded(txn_id)
        if _amounts(recorded) != _amounts(lines):
            raise LedgerError(f"transaction {txn_id} was already recorded with other amounts")
        return recorded, False

    async def _recorded(self, txn_id: str) -> list[Entry]:
        found = await self.store.get(store_keys.ledger_txn(txn_id))
        if found is None:
            return []
        return [entry_from_json(e) for e in orjson.loads(found.data)["entries"]]

    async def transaction(self, txn_id: str) -> list[Entry]:
        return await self._recorded(txn_id)

    async def in_balance(self, account: str, txn_id: str) -> bool:
        """Whether ``account``'s entry of ``txn_id`` is indexed, i.e. counted by ``balance`` (the
        transaction object is written first, so it can exist a moment before its entries count)."""
        return await self.store.get(store_keys.ledger_entry(account, txn_id)) is not None

    async def entries(self, account: str) -> list[Entry]:
        """Every entry on ``account``, oldest first."""
        keys = await self._list(store_keys.ledger_account_prefix(account))
        entries = await self._read_many(keys)
        return sorted(entries, key=lambda e: (e.created_at, e.txn_id))

    async def balance(self, account: str) -> int:
        return sum(e.amount_cents for e in await self.entries(account))

    async def audit(self) -> Ledger:
        """Every transaction, loaded into a ``core.ledger.Ledger`` and checked (``LedgerError`` if the
        ledger does not balance). For the operator's view and for tests; reads the whole ledger."""
        ledger = Ledger()
        for key in await self._list(store_keys.LEDGER_TXN_PREFIX):
            found = await self.store.get(key)
            if found is not None:
                ledger.append(entry_from_json(e) for e in orjson.loads(found.data)["entries"])
        ledger.check_balanced()
        return ledger

    async def _list(self, prefix: str) -> list[str]:
        keys: list[str] = []
        start_after = ""
        while True:
            page = await self.store.list(prefix, start_after=start_after, limit=1000)
            if not page:
                return keys
            keys.extend(page)
            start_after = page[-1]

    async def _read_many(self, keys: list[str]) -> list[Entry]:
        limit = asyncio.Semaphore(READ_CONCURRENCY)

        async def read(key: str) -> Entry | None:
            async with limit:
                found = await self.store.get(key)
            return None if found is None else entry_from_json(orjson.loads(found.data))

        return [e for e in await asyncio.gather(*(read(k) for k in keys)) if e is not None]


def _amounts(lines: list[Entry]) -> dict[str, int]:
    return {e.entry_id: e.amount_cents for e in lines}
