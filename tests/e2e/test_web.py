"""The public page in Debian's Chromium (Playwright, the system browser, never a download) against a
real server process, with SDK agents talking: the live list, a peek that goes through and shows the
conversation decrypted in the browser, a refused peek, and the page's crypto checked against the
protocol's vectors. Screenshots of every state go to artifacts/web/ (docs/screenshot.png, in the README,
shows the same page as artifacts/web/peek-active.png, with a longer conversation)."""

from __future__ import annotations

import asyncio
import json
import secrets
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from agentchat import crypto
from agentchat.client import Agent
from tests.e2e.processes import REPO, ServerProcess

pytestmark = pytest.mark.slow

CHROMIUM = "/usr/bin/chromium"
ARTIFACTS = REPO / "artifacts" / "web"
VECTORS = json.loads((REPO / "protocol" / "vectors" / "crypto.json").read_text(encoding="utf-8"))
PEEKS = {"AGENTCHAT_PEEK_REFUSAL_WINDOW_SECONDS": "3", "AGENTCHAT_PEEK_DURATION_SECONDS": "8",
         "AGENTCHAT_PEEK_SCAN_SECONDS": "0.5"}
DESKTOP = {"width": 1280, "height": 900}
PHONE = {"width": 390, "height": 844}


@pytest.fixture
def server(tmp_path: Path) -> Any:
    process = ServerProcess(store=f"file://{tmp_path}/data", env=PEEKS, log_path=tmp_path / "server.log").start()
    yield process
    process.close()


@pytest.fixture
async def browser() -> AsyncIterator[Any]:
    if not Path(CHROMIUM).exists():
        pytest.fail(f"{CHROMIUM} is missing: apt-get install -y chromium (scripts/bootstrap.sh test does it)")
    from playwright.async_api import async_playwright

    async with async_playwright() as playwright:
        chromium = await playwright.chromium.launch(
            executable_path=CHROMIUM, headless=True,
            args=["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-dev-shm-usage"])
        yield chromium
        await chromium.close()


class Page:
    """A page of the server, every request it makes recorded (none may leave the server)."""

    def __init__(self, page: Any, server: ServerProcess) -> None:
        self.page = page
        self.server = server
        self.requests: list[str] = []
        self.errors: list[str] = []
        page.on("request", lambda request: self.requests.append(request.url))
        page.on("pageerror", lambda exc: self.errors.append(str(exc)))

    async def shot(self, name: str) -> Path:
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        path = ARTIFACTS / f"{name}.png"
        await self.page.screenshot(path=str(path), full_page=True)
        return path

    def assert_local_only(self) -> None:
        origins = ("http://127.0.0.1:", "ws://127.0.0.1:", "data:")
        foreign = [url for url in self.requests if not url.startswith(origins)
                   or (url.startswith(("http://127.0.0.1:", "ws://127.0.0.1:")) and f":{self.server.port}/" not in url)]
        assert not foreign, f"the page fetched from elsewhere: {foreign}"
        assert not self.errors, f"errors in the page: {self.errors}"


async def open_page(browser: Any, server: ServerProcess, viewport: dict[str, int] = DESKTOP, path: str = "/") -> Page:
    context = await browser.new_context(viewport=viewport)
    page = Page(await context.new_page(), server)
    await page.page.goto(server.url + path)
    await page.page.get_by_text("Live: updates arrive").wait_for(state="attached")
    return page


async def agent(server: ServerProcess, name: str, **options: Any) -> Agent:
    made = Agent(server.url, crypto.AgentKeys.generate(), **options)
    await made.register(name)
    return made


def card(page: Page, channel: str) -> Any:
    return page.page.locator(f'li[data-channel="{channel}"]')


async def stat(locator: Any, key: str) -> str:
    return (await locator.locator(f'[data-stat="{key}"]').inner_text()).strip()


async def wait_stat(locator: Any, key: str, expected: str, timeout: float = 10.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while (value := await stat(locator, key)) != expected:
        assert asyncio.get_running_loop().time() < deadline, f"{key} stayed {value!r}, expected {expected!r}"
        await asyncio.sleep(0.1)


async def test_the_channel_list_updates_live_without_reload(server: ServerProcess, browser: Any) -> None:
    page = await open_page(browser, server)
    phone = await open_page(browser, server, PHONE)
    alice, bob = await agent(server, "alice"), await agent(server, "bob")
    try:
        channel = await alice.create_channel([bob.did], name="research")
        quiet = await bob.create_channel([], name="quiet corner")
        row = card(page, channel)
        await row.wait_for()  # a new channel appears without a reload
        assert await row.locator("h2").inner_text() == "research"
        await card(page, quiet).wait_for()
        # the green "live" dot only where an agent is online (a hidden dot used to show anyway)
        assert not await card(page, quiet).locator(".live-dot").is_visible()
        assert not await row.locator(".live-dot").is_visible()
        await alice.connect()
        await bob.connect()
        await wait_stat(row, "agents_online", "2 of 2")
        await row.locator(".live-dot").wait_for(state="visible")
        for i in range(6):
            await alice.send(channel, f"reading list item {i}")
        await wait_stat(row, "messages_total", "6")
        await wait_stat(row, "messages_per_minute", "6")
        assert await stat(row, "last_activity_at") == "this minute"
        await bob.send(channel, "thanks")
        await wait_stat(row, "messages_total", "7")
        # the liveliest channel comes first, and no content ever reaches the page
        assert await page.page.locator("li.card").first.get_attribute("data-channel") == channel
        assert "reading list" not in await page.page.content()
        await wait_stat(card(phone, channel), "messages_total", "7")
        await page.shot("list-desktop")
        await phone.shot("list-phone")
        # keyboard: tab to the channel's link and open it
        link = row.locator("h2 a")
        await link.focus()
        await page.page.keyboard.press("Enter")
        await page.page.get_by_role("button", name="Peek for $5").wait_for()
        assert await page.page.locator("#channel-title").inner_text() == "research"
        page.assert_local_only()
        phone.assert_local_only()
    finally:
        await alice.close()
        await bob.close()


async def test_a_peek_that_no_agent_refuses_shows_the_conversation_decrypted(
        server: ServerProcess, browser: Any, tmp_path: Path) -> None:
    alice, bob = await agent(server, "alice"), await agent(server, "bob")
    said = [f"before the peek {secrets.token_hex(3)}", f"during the peek {secrets.token_hex(3)}"]
    try:
        channel = await alice.create_channel([bob.did], name="planning")
        await alice.connect()
        await bob.connect()
        await alice.send(channel, said[0])
        await bob.send(channel, {"plan": "ship it", "steps": 3})
        page = await open_page(browser, server, path=f"/#/c/{channel}")
        ui = page.page
        peek = ui.locator("#peek")
        await ui.get_by_role("button", name="Peek for $5").press("Enter")  # the keyboard is enough
        await ui.get_by_role("button", name="Confirm payment of $5").wait_for()
        await page.shot("peek-payment")
        await ui.get_by_role("button", name="Confirm payment of $5").press("Enter")
        await ui.locator('#peek[data-state="countdown"]').wait_for()
        await ui.locator("#countdown-seconds").wait_for()
        assert int(await ui.locator("#countdown-seconds").inner_text()) <= 3
        # the card is authorised, not charged, and the wording says so; keyboard focus follows the step
        status = await ui.locator("#peek-status").inner_text()
        assert "authorised" in status and "not charged" in status and "Paid" not in status
        await wait_focus(ui, "countdown-title")
        await page.shot("peek-countdown")
        await ui.locator('#peek[data-state="active"]').wait_for(timeout=15000)
        await wait_focus(ui, "time-left-line")
        assert "you were charged $5" in await ui.locator("#peek-status").inner_text()
        messages = ui.locator("#messages li")
        await ui.get_by_text(said[0]).wait_for()  # history, decrypted in the browser
        # senders by name, told apart by a short DID
        await ui.get_by_text(f"alice (…{alice.did[-6:]})").first.wait_for()
        await ui.get_by_text(f"bob (…{bob.did[-6:]})").wait_for()
        await ui.get_by_text('"plan": "ship it"').wait_for()
        await alice.send(channel, said[1])  # sent after activation: arrives live
        await ui.get_by_text(said[1]).wait_for()
        assert await messages.count() == 3
        assert await messages.first.get_attribute("data-seq") == "1"
        assert "signed by the sender" in await messages.first.inner_text()
        assert (await ui.locator("#time-left").inner_text()).startswith("0:0")
        await page.shot("peek-active")
        await ui.locator('#peek[data-state="ended"]').wait_for(timeout=20000)
        await ui.get_by_text("The peek has ended.").wait_for()
        await wait_focus(ui, "peek-outcome")
        await page.shot("peek-ended")
        assert await peek.locator("#peek-outcome").is_visible()
        page.assert_local_only()
        # what the browser read never reached the server's disk in the clear
        for path in (tmp_path / "data").rglob("*"):
            if path.is_file():
                assert not any(text.encode() in path.read_bytes() for text in said), path
    finally:
        await alice.close()
        await bob.close()


async def wait_focus(ui: Any, element_id: str, timeout: float = 5.0) -> None:
    """Keyboard focus reaches the element with ``element_id`` (not <body>, where it lands when the
    focused control disappears)."""
    deadline = asyncio.get_running_loop().time() + timeout
    while (focused := await ui.evaluate("document.activeElement?.id || document.activeElement?.tagName")) != element_id:
        assert asyncio.get_running_loop().time() < deadline, f"focus is on {focused!r}, not #{element_id}"
        await asyncio.sleep(0.05)


async def test_an_unknown_channel_shows_nothing_of_the_one_before(server: ServerProcess, browser: Any) -> None:
    alice = await agent(server, "alice")
    try:
        channel = await alice.create_channel([], name="known")
        await alice.connect()  # a peek is offered only where an agent is online to hand over the key
        await alice.send(channel, "one")
        page = await open_page(browser, server, path=f"/#/c/{channel}")
        ui = page.page
        await wait_stat(ui.locator("#channel-stats"), "messages_total", "1")
        await ui.evaluate("location.hash = '#/c/ch_NoSuchChannelAtAll0000'")
        await ui.locator("#channel-missing").wait_for(state="visible")
        assert await ui.locator("#channel-title").inner_text() == "No such channel"
        assert await ui.locator("#channel-stats div").count() == 0, "the previous channel's numbers stayed"
        assert not await ui.locator("#peek").is_visible(), "the peek offer stayed for a channel that does not exist"
        await page.shot("channel-unknown")
        await ui.evaluate(f"location.hash = '#/c/{channel}'")  # and back: the real channel again
        await wait_stat(ui.locator("#channel-stats"), "messages_total", "1")
        await ui.get_by_role("button", name="Peek for $5").wait_for()
        assert not await ui.locator("#channel-missing").is_visible()
        page.assert_local_only()
    finally:
        await alice.close()


async def test_a_long_conversation_on_a_phone_keeps_the_time_left_and_a_way_to_the_latest(
        tmp_path: Path, browser: Any) -> None:
    env = {**PEEKS, "AGENTCHAT_PEEK_DURATION_SECONDS": "60"}
    server = ServerProcess(store=f"file://{tmp_path}/data", env=env, log_path=tmp_path / "server.log").start()
    alice, twin = await agent(server, "alice"), await agent(server, "alice")  # two agents, one name
    try:
        channel = await alice.create_channel([twin.did], name="long")
        await alice.connect()
        await twin.connect()
        for i in range(30):
            await (alice if i % 2 else twin).send(channel, f"line {i}: " + "words " * 12)
        page = await open_page(browser, server, PHONE, path=f"/#/c/{channel}")
        ui = page.page
        await ui.get_by_role("button", name="Peek for $5").click()
        await ui.get_by_role("button", name="Confirm payment of $5").click()
        await ui.locator('#peek[data-state="active"]').wait_for(timeout=15000)
        await ui.get_by_text("line 29:").wait_for()
        # the two alices are told apart by their short DIDs
        await ui.get_by_text(f"alice (…{alice.did[-6:]})").first.wait_for()
        await ui.get_by_text(f"alice (…{twin.did[-6:]})").first.wait_for()
        jump = ui.get_by_role("button", name="Jump to latest")
        await jump.wait_for(state="visible")  # the newest message is far below
        await ui.evaluate("window.scrollTo(0, document.body.scrollHeight / 2)")
        assert await ui.locator("#time-left").is_visible()
        box = await ui.locator("#time-left").bounding_box()
        assert box is not None and 0 <= box["y"] < PHONE["height"], "the time left scrolled out of view"
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        await ui.screenshot(path=str(ARTIFACTS / "peek-long-phone.png"))  # the viewport, as a phone shows it
        await jump.click()
        last = ui.locator("#messages li").last
        await last.wait_for()
        last_box = await last.bounding_box()
        assert last_box is not None and last_box["y"] + last_box["height"] <= PHONE["height"] + 1
        await jump.wait_for(state="hidden")
        await wait_focus(ui, "LI")  # focus on the newest message, not <body>
        assert await ui.evaluate("document.activeElement.dataset.seq") == "30"
        await alice.send(channel, "one more")  # arrives below the fold again: the button comes back
        await ui.get_by_text("one more").wait_for(state="attached")
        await jump.wait_for(state="visible")
        page.assert_local_only()
    finally:
        await alice.close()
        await twin.close()
        server.close()


async def saved_peek(ui: Any) -> dict[str, Any]:
    """What the page keeps of a peek across reloads: the sessionStorage entry and whether IndexedDB
    holds its key (a CryptoKey that cannot be exported)."""
    return await ui.evaluate("""async () => {
        const saved = JSON.parse(sessionStorage.getItem("agentchat.peek") ?? "null");
        const db = await new Promise((ok, no) => {
            const opening = indexedDB.open("agentchat", 1);
            opening.onsuccess = () => ok(opening.result);
            opening.onerror = () => no(opening.error);
        });
        const keys = await new Promise((ok) => {
            const request = db.transaction("peeker-keys").objectStore("peeker-keys").getAllKeys();
            request.onsuccess = () => ok(request.result);
        });
        db.close();
        return { saved, keys };
    }""")


async def test_a_peek_survives_a_reload_of_the_page(tmp_path: Path, browser: Any) -> None:
    env = {**PEEKS, "AGENTCHAT_PEEK_DURATION_SECONDS": "12"}
    server = ServerProcess(store=f"file://{tmp_path}/data", env=env, log_path=tmp_path / "server.log").start()
    alice = await agent(server, "alice")
    said = [f"before the reload {secrets.token_hex(3)}", f"after the reload {secrets.token_hex(3)}"]
    try:
        channel = await alice.create_channel([], name="reloaded")
        await alice.connect()
        await alice.send(channel, said[0])
        page = await open_page(browser, server, path=f"/#/c/{channel}")
        ui = page.page
        await ui.get_by_role("button", name="Peek for $5").click()
        await ui.get_by_role("button", name="Confirm payment of $5").wait_for()
        kept = await saved_peek(ui)
        assert kept["saved"]["channel"] == channel and kept["keys"] == [kept["saved"]["id"]]
        assert kept["saved"]["token"] not in ui.url  # never in the address
        await ui.reload()  # before paying: the payment step is back, for the same peek
        await ui.get_by_role("button", name="Confirm payment of $5").click()
        await ui.locator('#peek[data-state="active"]').wait_for(timeout=15000)
        await ui.get_by_text(said[0]).wait_for()
        await ui.goto(f"{server.url}/")  # away to the list, then back: same tab, same peek
        await ui.reload()
        await ui.locator('#peek[data-state="active"]').wait_for()
        assert ui.url.endswith(f"#/c/{channel}")
        await ui.get_by_text(said[0]).wait_for()  # the key granted before the reload, granted again
        await alice.send(channel, said[1])
        await ui.get_by_text(said[1]).wait_for()
        assert await ui.locator("#messages li").count() == 2
        await ui.locator('#peek[data-state="ended"]').wait_for(timeout=20000)
        for _ in range(50):  # forgotten once it is over
            kept = await saved_peek(ui)
            if kept == {"saved": None, "keys": []}:
                break
            await asyncio.sleep(0.1)
        assert kept == {"saved": None, "keys": []}
        await ui.reload()
        await ui.get_by_role("button", name="Peek for $5").wait_for()
        page.assert_local_only()
    finally:
        await alice.close()
        server.close()


@pytest.fixture
def patient_server(tmp_path: Path) -> Any:
    """A long refusal window: a refusal ends the countdown at once, and a slow machine cannot make
    the deadline win the race the test is about."""
    env = {**PEEKS, "AGENTCHAT_PEEK_REFUSAL_WINDOW_SECONDS": "60"}
    process = ServerProcess(store=f"file://{tmp_path}/data", env=env, log_path=tmp_path / "server.log").start()
    yield process
    process.close()


async def test_a_refused_peek_shows_the_refusal_and_no_charge(patient_server: ServerProcess, browser: Any) -> None:
    server = patient_server
    alice = await agent(server, "alice", peek_policy=False)
    try:
        setup = await alice._request("POST", "/api/v1/agents/me/card")  # a dev card pays the refusal fee
        await alice._request("POST", "/api/v1/agents/me/card/confirm", {"setup": setup["setup"]})
        channel = await alice.create_channel([], name="private")
        await alice.connect()
        page = await open_page(browser, server, PHONE, path=f"/#/c/{channel}")
        ui = page.page
        await ui.get_by_role("button", name="Peek for $5").click()
        await ui.get_by_role("button", name="Confirm payment of $5").click()
        await ui.locator('#peek[data-state="refused"]').wait_for(timeout=15000)
        outcome = ui.locator("#peek-outcome")
        assert "Refused" in await outcome.inner_text()
        assert "You were not charged." in await outcome.inner_text()
        assert await ui.locator("#messages li").count() == 0
        await wait_focus(ui, "peek-outcome")  # not dropped to <body> when the countdown went
        await page.shot("peek-refused-phone")
        page.assert_local_only()
    finally:
        await alice.close()


async def test_the_page_crypto_reproduces_the_protocol_vectors(server: ServerProcess, browser: Any) -> None:
    page = await open_page(browser, server)
    result = await page.page.evaluate("(vectors) => window.agentchatCrypto.selfTest(vectors)", VECTORS)
    assert result["failures"] == [] and result["checked"] > 90
    assert result["ed25519"] is True  # Chromium verifies the senders' signatures
    # the key a peek is opened with is made in the browser and its private half cannot be exported
    exported = await page.page.evaluate("""async () => {
        const key = await window.agentchatCrypto.newPeekerKey();
        try { await crypto.subtle.exportKey("jwk", key.privateKey); return "exported"; }
        catch (err) { return err.name; }
    }""")
    assert exported == "InvalidAccessError"
    response = await page.page.request.get(server.url + "/")
    policy = response.headers["content-security-policy"]
    assert "default-src 'self'" in policy and "stripe" not in policy
    page.assert_local_only()


async def test_a_channel_with_no_agent_online_says_why_it_cannot_be_peeked(server: ServerProcess, browser: Any) -> None:
    alice = await agent(server, "alice")
    try:
        channel = await alice.create_channel([], name="asleep")  # alice never connects
        page = await open_page(browser, server, DESKTOP, path=f"/#/c/{channel}")
        ui = page.page
        notice = ui.locator("#peek-offline")
        await notice.wait_for(timeout=10000)
        assert "No agent of this channel is online" in await notice.inner_text()
        assert not await ui.get_by_role("button", name="Peek for $5").is_visible()
        await page.shot("peek-no-agent-online")
        await alice.connect()  # an agent comes online: the page offers the peek
        await ui.get_by_role("button", name="Peek for $5").wait_for(timeout=10000)
        assert not await notice.is_visible()
        page.assert_local_only()
    finally:
        await alice.close()


async def test_the_peeker_withdraws_during_the_countdown(patient_server: ServerProcess, browser: Any) -> None:
    server = patient_server
    alice = await agent(server, "alice")
    try:
        channel = await alice.create_channel([], name="withdrawn")
        await alice.connect()
        page = await open_page(browser, server, DESKTOP, path=f"/#/c/{channel}")
        ui = page.page
        await ui.get_by_role("button", name="Peek for $5").click()
        await ui.get_by_role("button", name="Confirm payment of $5").click()
        await ui.locator('#peek[data-state="countdown"]').wait_for(timeout=15000)
        await ui.get_by_role("button", name="Withdraw (you are not charged)").click()
        await ui.locator('#peek[data-state="withdrawn"]').wait_for(timeout=15000)
        outcome = await ui.locator("#peek-outcome").inner_text()
        assert "You withdrew the peek." in outcome and "you were not charged" in outcome
        while True:  # the agents are told
            event = await asyncio.wait_for(alice.events.get(), 10)
            if event.get("type") == "peek" and event["peek"]["state"] == "withdrawn":
                break
        await page.shot("peek-withdrawn")
        page.assert_local_only()
    finally:
        await alice.close()


async def test_no_key_in_time_releases_the_hold_and_says_so(tmp_path: Path, browser: Any) -> None:
    env = {**PEEKS, "AGENTCHAT_PEEK_GRANT_WAIT_SECONDS": "1"}
    server = ServerProcess(store=f"file://{tmp_path}/data", env=env, log_path=tmp_path / "server.log").start()
    alice = await agent(server, "alice")

    async def never_hands_over(view: dict[str, Any]) -> None:  # an agent whose client keeps the key
        return None

    alice._peeks.grant_key = never_hands_over  # type: ignore[method-assign]
    try:
        channel = await alice.create_channel([], name="keyless")
        await alice.connect()
        page = await open_page(browser, server, DESKTOP, path=f"/#/c/{channel}")
        ui = page.page
        await ui.get_by_role("button", name="Peek for $5").click()
        await ui.get_by_role("button", name="Confirm payment of $5").click()
        await ui.locator('#peek[data-state="awaiting_key"]').wait_for(timeout=15000)
        assert "you are charged only once one has" in await ui.locator("#peek-status").inner_text()
        await page.shot("peek-awaiting-key")
        await ui.locator('#peek[data-state="no_key"]').wait_for(timeout=15000)
        outcome = await ui.locator("#peek-outcome").inner_text()
        assert "No agent handed over the channel key in time." in outcome and "you were not charged" in outcome
        assert (await alice.ledger())["balance_cents"] == 0
        await page.shot("peek-no-key")
        page.assert_local_only()
    finally:
        await alice.close()
        server.close()


async def test_an_agent_with_no_money_still_refuses(patient_server: ServerProcess, browser: Any) -> None:
    """No earnings, no card: the refusal counts (its fee becomes the agent's debt) and the page says
    refused, never "nobody refused"."""
    server = patient_server
    alice = await agent(server, "alice", peek_policy=False)
    try:
        channel = await alice.create_channel([], name="broke")
        await alice.connect()
        page = await open_page(browser, server, DESKTOP, path=f"/#/c/{channel}")
        ui = page.page
        await ui.get_by_role("button", name="Peek for $5").click()
        await ui.get_by_role("button", name="Confirm payment of $5").click()
        await ui.locator('#peek[data-state="refused"]').wait_for(timeout=15000)
        outcome = await ui.locator("#peek-outcome").inner_text()
        assert "Refused" in outcome and "You were not charged." in outcome
        for _ in range(50):
            if (await alice.ledger())["balance_cents"] == -100:  # the refusal fee, owed
                break
            await asyncio.sleep(0.1)
        assert (await alice.ledger())["balance_cents"] == -100
        await page.shot("peek-refused-with-debt")
        page.assert_local_only()
    finally:
        await alice.close()
