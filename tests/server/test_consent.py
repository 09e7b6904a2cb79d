"""Nobody is made a member without consent, and nobody is pushed off its channels by volume:
invitations (accepted by the SDK's policy), leaving, blocking, hourly allowances, complete listings."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from agentchat import crypto
from agentchat.client import Agent, AgentChatClientError
from agentchat.config import load_settings
from agentchat.server.app import build_app
from agentchat.server.appkeys import HUB
from tests.conftest import RestAgent
from tests.server.test_frames_conformance import kind, open_socket
from tests.server.test_rest import envelope, new_channel_id


async def invite(owner: RestAgent, invitees: list[RestAgent], key: bytes | None = None,
                 channel: str | None = None) -> tuple[str, bytes]:
    """Create a channel naming ``invitees``, without anyone accepting."""
    channel = channel or new_channel_id()
    key = key or crypto.new_epoch_key()
    wrapped = {a.did: crypto.wrap_epoch_key(key, a.keys.public.encryption_key, channel=channel, epoch=1,
                                            recipient=a.did) for a in [owner, *invitees]}
    status, body = await owner.call("POST", "/api/v1/channels", json={
        "id": channel, "name": "junk", "members": [a.did for a in invitees], "epoch_keys": wrapped})
    assert status == 201, body
    return channel, key


async def test_a_pending_invitee_reads_nothing_counts_for_nothing_and_is_told_live(client, make_agent) -> None:
    alice, bob = await make_agent("alice"), await make_agent("bob")
    ws_bob = await open_socket(client, {"type": "hello", "token": bob.token})
    await ws_bob.wait_for(kind("welcome"))
    channel, key = await invite(alice, [bob])
    invitation = await ws_bob.wait_for(kind("invitation", channel=channel))
    assert invitation["by"] == alice.did and invitation["members"] == 1
    status, body = await alice.call("POST", f"/api/v1/channels/{channel}/messages",
                                    json={"client_id": "c1", "envelope": envelope(alice, channel, key, "hi", "c1")})
    assert status == 201
    for path in (f"/api/v1/channels/{channel}/messages", f"/api/v1/channels/{channel}",
                 f"/api/v1/channels/{channel}/epochs/current/key"):
        status, body = await bob.call("GET", path)
        assert status == 403 and body["error"]["code"] == "not_member", path
    status, body = await bob.call("GET", "/api/v1/channels")
    assert body["channels"] == []
    assert not [f for f in ws_bob.frames if f.get("type") == "message"]
    indicators = await (await client.get(f"/api/v1/indicators/{channel}")).json()
    assert indicators["members"] == 1
    # accepting: delivered from now on, history readable
    status, body = await bob.call("POST", f"/api/v1/invitations/{channel}/accept")
    assert status == 200 and bob.did in body["members"]
    await ws_bob.wait_for(kind("channel", event="added", channel=channel))
    status, body = await bob.call("GET", f"/api/v1/channels/{channel}/messages")
    assert status == 200 and len(body["messages"]) == 1
    status, body = await bob.call("POST", f"/api/v1/invitations/{channel}/accept")
    assert status == 200  # idempotent


async def test_decline_leave_and_block(client, make_agent) -> None:
    alice, bob, mallory = await make_agent("alice"), await make_agent("bob"), await make_agent("mallory")
    channel, _ = await invite(alice, [bob])
    status, _ = await bob.call("POST", f"/api/v1/invitations/{channel}/decline")
    assert status == 200
    status, body = await bob.call("GET", "/api/v1/invitations")
    assert body["invitations"] == []
    status, body = await bob.call("POST", f"/api/v1/invitations/{channel}/accept")
    assert status == 404 and body["error"]["code"] == "invitation_not_found"
    # bob blocks mallory: her pending invitation goes, new ones are refused
    pending, _ = await invite(mallory, [bob])
    status, _ = await bob.call("PUT", f"/api/v1/agents/me/blocks/{mallory.did}")
    assert status == 200
    status, body = await bob.call("GET", "/api/v1/invitations")
    assert body["invitations"] == []
    status, body = await mallory.call("GET", f"/api/v1/channels/{pending}")
    assert body["invited"] == []
    for attempt in ("create", "add"):
        if attempt == "create":
            key = crypto.new_epoch_key()
            cid = new_channel_id()
            wrapped = {a.did: crypto.wrap_epoch_key(key, a.keys.public.encryption_key, channel=cid, epoch=1,
                                                    recipient=a.did) for a in (mallory, bob)}
            status, body = await mallory.call("POST", "/api/v1/channels", json={
                "id": cid, "members": [bob.did], "epoch_keys": wrapped})
        else:
            status, body = await mallory.call("POST", f"/api/v1/channels/{pending}/members", json={"did": bob.did})
        assert status == 403 and body["error"]["code"] == "invitation_refused", attempt
    status, _ = await bob.call("DELETE", f"/api/v1/agents/me/blocks/{mallory.did}")
    status, body = await mallory.call("POST", f"/api/v1/channels/{pending}/members", json={"did": bob.did})
    assert status == 200 and body["invited"] == [bob.did]
    # leaving a channel bob joined
    status, _ = await bob.call("POST", f"/api/v1/invitations/{pending}/accept")
    status, body = await bob.call("DELETE", f"/api/v1/channels/{pending}/members/{bob.did}")
    assert status == 200 and bob.did not in body["members"]
    status, body = await bob.call("GET", f"/api/v1/channels/{pending}/messages")
    assert status == 403


async def test_channel_creations_and_invitations_are_limited_per_agent_and_per_address(aiohttp_client, tmp_path) -> None:
    settings = load_settings(env={}, store=f"file://{tmp_path}/data", token_secret="t" * 40,
                             channel_creations_per_hour=3, channel_creations_per_hour_per_address=5,
                             invitations_per_hour=4, invitations_per_hour_per_address=100)
    client = await aiohttp_client(build_app(settings))
    a, b, c = [await RestAgent(client, n).register() for n in ("a", "b", "c")]
    for _ in range(3):
        await invite(a, [])
    with pytest.raises(AssertionError, match="too_many_channels"):
        await invite(a, [])
    await invite(b, [])
    await invite(b, [])  # the address's 5th
    with pytest.raises(AssertionError, match="too_many_channels"):
        await invite(b, [])  # b's own allowance is not used up, the address's is
    settings2 = load_settings(env={}, store=f"file://{tmp_path}/data2", token_secret="t" * 40,
                              invitations_per_hour=4)
    client2 = await aiohttp_client(build_app(settings2))
    owner, *others = [await RestAgent(client2, f"x{i}").register() for i in range(6)]
    channel, _ = await invite(owner, others[:3])
    status, body = await owner.call("POST", f"/api/v1/channels/{channel}/members", json={"did": others[3].did})
    assert status == 200
    status, body = await owner.call("POST", f"/api/v1/channels/{channel}/members", json={"did": others[4].did})
    assert status == 429 and body["error"]["code"] == "too_many_invitations" and body["error"]["retryable"]


async def test_a_thousand_junk_invitations_do_not_push_a_channel_out_of_any_listing(aiohttp_client, tmp_path) -> None:
    """The attack of issue 12 item 4, at a smaller page size: past the page, nothing is cut off."""
    settings = load_settings(env={}, store=f"file://{tmp_path}/data", token_secret="t" * 40, channels_page_max=5)
    client = await aiohttp_client(build_app(settings))
    victim, friend, spammer = [await RestAgent(client, n).register() for n in ("victim", "friend", "spammer")]
    junk = [(await invite(spammer, [victim]))[0] for _ in range(12)]
    real = []
    for _ in range(12):  # the victim's own channels, more than two pages of them
        channel, key = await invite(victim, [friend])
        await friend.call("POST", f"/api/v1/invitations/{channel}/accept")
        real.append((channel, key))
    status, body = await victim.call("GET", "/api/v1/channels", params={"limit": 5})
    assert status == 200 and len(body["channels"]) == 5 and body["has_more"]
    listed, after = [], ""
    while True:
        status, body = await victim.call("GET", "/api/v1/channels", params={"limit": 5, **({"after": after} if after else {})})
        listed += [c["id"] for c in body["channels"]]
        after = body["next_after"]
        if not body["has_more"]:
            break
    assert sorted(listed) == sorted(c for c, _ in real), "junk invitations are not channels of the victim"
    invitations, after = [], ""
    while True:
        status, body = await victim.call("GET", "/api/v1/invitations", params={"limit": 5, **({"after": after} if after else {})})
        invitations += [i["channel"] for i in body["invitations"]]
        after = body["next_after"]
        if not body["has_more"]:
            break
    assert sorted(invitations) == sorted(junk)
    # The socket: every channel in the welcome and the channels frames, each delivered and resumable.
    last_channel, last_key = sorted(real)[-1]
    ws = await open_socket(client, {"type": "hello", "ref": "h", "token": victim.token, "resume": {last_channel: 0}})
    welcome = await ws.wait_for(kind("welcome", ref="h"))
    assert len(welcome["channels"]) == 5 and welcome["more"] is True
    await ws.wait_for(lambda f: f.get("type") == "channels" and f["more"] is False)
    pages = [welcome["channels"]] + [f["channels"] for f in ws.frames if f.get("type") == "channels"]
    assert sorted(c for p in pages for c in p) == sorted(c for c, _ in real)
    status, _ = await friend.call("POST", f"/api/v1/channels/{last_channel}/messages", json={
        "client_id": "late", "envelope": envelope(friend, last_channel, last_key, "still here", "late")})
    assert status == 201
    await ws.wait_for(kind("message", channel=last_channel, client_id="late"))
    assert not [f for f in ws.frames if f.get("type") == "error"]


async def test_the_sdk_accepts_by_its_policy_and_the_quick_start_flow_works(client, sdk_agents) -> None:
    alice, bob = await sdk_agents("alice"), await sdk_agents("bob")
    channel = await alice.create_channel([bob.did])
    await bob.connect()  # default policy "all": the pending invitation is accepted at connect
    await alice.send(channel, "hello bob")
    message = await bob.next_message(10)
    assert message.text == "hello bob"
    # "none" leaves invitations pending until the application decides
    url = alice.server
    carol = Agent(url, crypto.AgentKeys.generate(), invitation_policy="none")
    await carol.register("carol")
    try:
        second = await alice.create_channel([carol.did])
        await carol.connect()
        with pytest.raises(AgentChatClientError) as refused:
            await carol.history(second)
        assert refused.value.code == "not_member"
        assert [i["channel"] for i in await carol.invitations()] == [second]
        await carol.accept_invitation(second)
        assert await carol.history(second) == []
        # "known" accepts from an agent it shares a channel with, and leaves strangers pending
        carol.invitation_policy = "known"
        third = await alice.create_channel([carol.did])
        stranger = await sdk_agents("stranger")
        fourth = await stranger.create_channel([carol.did])
        for _ in range(100):
            if third not in [i["channel"] for i in await carol.invitations()]:
                break
            await asyncio.sleep(0.05)
        assert [i["channel"] for i in await carol.invitations()] == [fourth]
        await carol.block(stranger.did)
        assert await carol.invitations() == [] and await carol.blocked() == [stranger.did]
        await carol.leave(third)
        assert third not in [c["id"] for c in await carol.channels()]
    finally:
        await carol.close()


async def test_a_declined_invitation_is_announced_with_its_epoch_so_members_rotate(client, sdk_agents) -> None:
    alice, bob = await sdk_agents("alice"), await sdk_agents("bob")
    bob.invitation_policy = lambda invitation: False
    channel = await alice.create_channel([bob.did])
    await alice.connect()
    await bob.connect()
    for _ in range(100):
        meta = await alice.channel(channel)
        if meta["epoch"] == 2:
            break
        await asyncio.sleep(0.05)
    assert meta["invited"] == [] and meta["epoch"] == 2, "bob held epoch 1's key: alice rotated past it"
    hub = client.server.app[HUB]
    assert bob.did not in hub.rooms[channel].members
