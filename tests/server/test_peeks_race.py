"""A refusal racing the deadline, across two server "processes" (two apps on one store, no shared bus),
many times: exactly one outcome wins, and the money follows that outcome and only it."""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from pathlib import Path
from typing import Any

from agentchat.config import load_settings
from agentchat.core.peek import PeekState
from agentchat.errors import AgentChatError
from agentchat.server.app import build_app
from agentchat.server.appkeys import LEDGER, PEEKS
from agentchat.store.keys import peek_refusal
from tests.conftest import RestAgent
from tests.server.peek_agents import go_online
from tests.server.test_peeks import call, check_ledger, fund_with_dev_card, grant_now, open_peek
from tests.server.test_rest import create_channel


async def two_processes(aiohttp_client: Any, tmp_path: Path, **peeks: Any) -> tuple[Any, Any]:
    def settings() -> Any:
        return load_settings(env={}, store=f"file://{tmp_path}/data", token_secret="t" * 40,
                             auth_requests_per_second=10_000, **peeks)
    return await aiohttp_client(build_app(settings())), await aiohttp_client(build_app(settings()))


async def test_refusal_against_the_deadline_with_an_injected_clock(aiohttp_client: Any, tmp_path: Path) -> None:
    """Process A takes a refusal a hair before the deadline while process B, whose clock says the
    deadline is here, drives the peek; B starts after a varying number of scheduling steps, in every
    other run only once A has secured the refusal fee (A's write is then under way), so each side
    wins some of the runs."""
    a, b = await two_processes(aiohttp_client, tmp_path, peek_refusal_window_seconds=60.0,
                               peek_duration_seconds=60.0, peek_scan_seconds=3600.0)
    alice = await RestAgent(a, "alice").register()
    channel, _ = await create_channel(alice, [])
    await fund_with_dev_card(alice)
    await go_online(a, alice, grant=False)
    service_a, service_b = a.server.app[PEEKS], b.server.app[PEEKS]
    outcomes: Counter[str] = Counter()
    for run in range(40):
        opened, auth = await open_peek(a, channel)
        peek_id = opened["peek"]["id"]
        await call(a, "POST", f"/api/v1/peeks/{peek_id}/confirm", auth)
        deadline = (await service_a.load(peek_id)).deadline
        assert deadline is not None
        service_a.clock = lambda: deadline - 1e-4
        service_b.clock = lambda: deadline

        async def drive_b(steps: int = run % 8, after_fee: bool = bool(run % 2)) -> None:
            while after_fee and await service_a.store.get(peek_refusal(peek_id, alice.did)) is None:
                await asyncio.sleep(0)
            for _ in range(steps):
                await asyncio.sleep(0)
            await service_b.scan()

        refusal, _ = await asyncio.gather(service_a.refuse(peek_id, alice.did), drive_b(), return_exceptions=True)
        service_a.clock = service_b.clock = time.time
        if (await service_b.load(peek_id)).state is PeekState.AWAITING_KEY:  # the deadline won: hand the key
            await grant_now(a, alice, peek_id)
        ledger = await check_ledger(a.server.app, lambda l: bool(l.transaction(f"capture/{peek_id}")
                                                                 or l.transaction(f"refusal_fee/{peek_id}")))
        final = await service_b.load(peek_id)
        captured, fee = ledger.transaction(f"capture/{peek_id}"), ledger.transaction(f"refusal_fee/{peek_id}")
        if isinstance(refusal, AgentChatError):
            assert refusal.code == "peek_state", refusal
            assert final.state is PeekState.ACTIVE and captured and not fee
        else:
            assert final.state is PeekState.REFUSED and final.refused_by == alice.did
            assert fee and not captured
        outcomes[final.state] += 1
    assert sum(outcomes.values()) == 40
    # Both sides of the race were exercised (the refusal needs more steps before its write).
    assert outcomes[PeekState.REFUSED] and outcomes[PeekState.ACTIVE], outcomes
    ledger = await check_ledger(b.server.app)
    assert ledger.balance("platform") == 150 * outcomes[PeekState.ACTIVE] + 100 * outcomes[PeekState.REFUSED]


async def test_refusal_over_http_at_the_real_deadline(aiohttp_client: Any, tmp_path: Path) -> None:
    """Real clocks and timers on both processes; the refusal is sent to B around A's deadline."""
    a, b = await two_processes(aiohttp_client, tmp_path, peek_refusal_window_seconds=0.3,
                               peek_duration_seconds=60.0, peek_scan_seconds=0.1)
    alice = await RestAgent(a, "alice").register()
    channel, _ = await create_channel(alice, [])
    await fund_with_dev_card(alice)
    await go_online(a, alice)  # hands over the key when the deadline wins
    alice_on_b = {"Authorization": f"Bearer {alice.token}"}
    outcomes: Counter[str] = Counter()
    for run in range(12):
        opened, auth = await open_peek(a, channel)
        peek_id = opened["peek"]["id"]
        status, body = await call(a, "POST", f"/api/v1/peeks/{peek_id}/confirm", auth)
        deadline = body["peek"]["deadline"] / 1000
        await asyncio.sleep(max(0.0, deadline - time.time() + (run % 6 - 3) * 0.01))
        status, body = await call(b, "POST", f"/api/v1/peeks/{peek_id}/refuse", alice_on_b)
        # Each process has its own in-process bus here: when B decided the deadline, alice's socket on A
        # hears of it only at A's next look at the peek, so the key is handed over directly.
        await asyncio.sleep(0.05)
        if (await b.server.app[PEEKS].load(peek_id)).state is PeekState.AWAITING_KEY:
            await grant_now(a, alice, peek_id)
        ledger = await check_ledger(b.server.app, lambda l: bool(l.transaction(f"capture/{peek_id}")
                                                                 or l.transaction(f"refusal_fee/{peek_id}")))
        final = await b.server.app[PEEKS].load(peek_id)
        if status == 200:
            assert body["peek"]["state"] == "refused" and final.state is PeekState.REFUSED
            assert ledger.transaction(f"refusal_fee/{peek_id}") and not ledger.transaction(f"capture/{peek_id}")
        else:
            assert (status, body["error"]["code"]) == (409, "peek_state"), body
            assert final.state in (PeekState.AWAITING_KEY, PeekState.CAPTURING, PeekState.ACTIVE)
            assert not ledger.transaction(f"refusal_fee/{peek_id}")
        outcomes[final.state] += 1
    ledger = await b.server.app[LEDGER].audit()
    refused = outcomes[PeekState.REFUSED]
    assert ledger.balance("platform") == 150 * (12 - refused) + 100 * refused
