"""Membership is authoritative: a stored removal is enforced everywhere, retried removals succeed and
are announced again, and channel records written before membership versions keep working."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import orjson

from agentchat import crypto
from agentchat.errors import error
from agentchat.server.appkeys import HUB, RECORDS
from agentchat.server.membership import membership_counter, version_of
from agentchat.store import keys
from tests.server.test_rest import create_channel, envelope


async def _wait_for(predicate: Any, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not await predicate():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.05)


async def _events(agent: Any, kind: str, timeout: float = 5.0) -> list[dict[str, Any]]:
    found = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            frame = await asyncio.wait_for(agent.events.get(), 0.2)
        except asyncio.TimeoutError:
            if found:
                break
            continue
        if frame.get("event") == kind:
            found.append(frame)
    return found


async def test_a_retried_removal_succeeds_and_is_announced_again(client, sdk_agents) -> None:
    alice, bob, carol = await sdk_agents("alice"), await sdk_agents("bob"), await sdk_agents("carol")
    channel = await alice.create_channel([bob.did, carol.did])
    await bob.channel(channel)  # accepts the invitation by its policy
    await carol.connect()
    await carol.channel(channel)
    await _events(carol, "added")
    first = await alice._request("DELETE", f"/api/v1/channels/{channel}/members/{bob.did}")
    again = await alice._request("DELETE", f"/api/v1/channels/{channel}/members/{bob.did}")
    assert bob.did not in first["members"] and again["members"] == first["members"]
    removed = await _events(carol, "member_removed")
    assert [e["did"] for e in removed] == [bob.did, bob.did]
    assert removed[0]["epoch"] == removed[1]["epoch"] == 1
    # Leaving is idempotent too, for the one who left
    await carol._request("DELETE", f"/api/v1/channels/{channel}/members/{carol.did}")
    await carol._request("DELETE", f"/api/v1/channels/{channel}/members/{carol.did}")
    # A DID that never was a member: nothing to do, nothing announced
    stranger = crypto.AgentKeys.generate().did
    meta = await alice._request("DELETE", f"/api/v1/channels/{channel}/members/{stranger}")
    assert meta["members"] == [alice.did]


class _PublishFailsOnce:
    """The bus refuses the next channel-event publish, as a Redis blip right after the store write."""

    def __init__(self, hub: Any) -> None:
        self.hub = hub
        self.original = hub.publish_channel_event
        self.failed = 0
        hub.publish_channel_event = self

    async def __call__(self, channel: str, event: dict[str, Any]) -> None:
        if event.get("event") == "member_removed" and not self.failed:
            self.failed += 1
            raise error("bus_unavailable")
        await self.original(channel, event)


async def test_the_sdk_rotates_the_epoch_after_a_removal_whose_first_answer_was_an_error(client, sdk_agents) -> None:
    alice, bob = await sdk_agents("alice"), await sdk_agents("bob")
    channel = await alice.create_channel([bob.did])
    await bob.channel(channel)  # accepts the invitation by its policy
    fault = _PublishFailsOnce(client.server.app[HUB])
    meta = await alice.remove_member(channel, bob.did)
    assert fault.failed == 1  # the first answer was 503, after the store took the removal
    assert meta["epoch"] == 2 and bob.did not in meta["members"]
    status = await client.get(f"/api/v1/channels/{channel}/epochs/2/key",
                              headers={"Authorization": "Bearer " + await bob.token()})
    assert status.status == 403


async def test_a_stored_removal_nobody_announced_is_enforced_on_every_path(client, make_agent) -> None:
    """The process that stored the removal died before publishing: the version check finds it."""
    app = client.server.app
    alice, bob = await make_agent("alice"), await make_agent("bob")
    channel, key = await create_channel(alice, [bob])
    ws = await client.ws_connect("/api/v1/ws")
    await ws.send_json({"type": "hello", "token": bob.token, "resume": {}})
    assert (await ws.receive_json())["type"] == "welcome"
    # Written as another process would, up to the intent and the store, then nothing.
    hub, records = app[HUB], app[RECORDS]

    def remove(current: dict[str, Any]) -> dict[str, Any]:
        return {**current, "members": [alice.did], "version": version_of(current) + 1}

    stored = await records.update_channel(channel, remove)
    await hub.bus.seed_sequence(membership_counter(channel), stored["version"])
    frame = await asyncio.wait_for(ws.receive_json(), 5)
    assert frame == {"type": "channel", "channel": channel, "event": "removed"}
    status, body = await bob.call("GET", f"/api/v1/channels/{channel}/messages")
    assert status == 403 and body["error"]["code"] == "not_member"
    status, body = await bob.call("POST", f"/api/v1/channels/{channel}/messages",
                                  json={"client_id": "c1", "envelope": envelope(bob, channel, key, "hi", "c1")})
    assert status == 403 and body["error"]["code"] == "not_member"
    await ws.send_json({"type": "resume", "resume": {channel: 0}})
    frame = await asyncio.wait_for(ws.receive_json(), 5)
    assert frame["type"] == "error" and frame["code"] == "not_member"
    await ws.close()


async def test_a_channel_record_in_the_old_layout_is_read_as_accepted_members_at_version_0(client, make_agent) -> None:
    app = client.server.app
    alice, bob = await make_agent("alice"), await make_agent("bob")
    channel = "ch_" + "o" * 22
    key = crypto.new_epoch_key()
    wrapped = {m.did: crypto.wrap_epoch_key(key, m.keys.public.encryption_key, channel=channel, epoch=1,
                                             recipient=m.did) for m in (alice, bob)}
    store = app[RECORDS].store
    now = int(time.time() * 1000)
    # Exactly what the code before membership versions wrote.
    await store.put(keys.epoch(channel, 1), orjson.dumps({"channel": channel, "epoch": 1, "created_by": alice.did,
                                                          "created_at": now, "keys": wrapped}))
    await store.put(keys.channel(channel), orjson.dumps({
        "id": channel, "name": "old", "owner": alice.did, "members": sorted([alice.did, bob.did]), "epoch": 1,
        "created_at": now, "updated_at": now}))
    for member in (alice, bob):
        await store.put(keys.membership(member.did, channel), b"")
    await store.put(keys.channel_index(channel), b"")
    status, listing = await bob.call("GET", "/api/v1/channels")
    assert [c["id"] for c in listing["channels"]] == [channel]
    status, body = await bob.call("POST", f"/api/v1/channels/{channel}/messages",
                                  json={"client_id": "c1", "envelope": envelope(bob, channel, key, "hi", "c1")})
    assert status == 201, body
    status, body = await alice.call("DELETE", f"/api/v1/channels/{channel}/members/{bob.did}")
    assert status == 200 and body["members"] == [alice.did]
    assert version_of(await app[RECORDS].get_channel(channel)) == 1
    status, body = await bob.call("GET", f"/api/v1/channels/{channel}/messages")
    assert status == 403


async def test_a_process_that_missed_an_epoch_event_takes_the_senders_newer_epoch(client, sdk_agents) -> None:
    """Another process rotated the channel's epoch and the event never reached this one (a bus blip):
    a send sealed under the new epoch is taken here after one re-read of the record (before: every
    send was refused with stale_epoch until the next membership change)."""
    alice = await sdk_agents("alice")
    channel = await alice.create_channel([])
    assert await alice.send(channel, "at epoch 1") == 1
    hub = client.server.app[HUB]
    apply_channel, publish = hub.apply_channel, hub.publish_channel_event

    async def lost(channel_id: str, event: dict[str, Any]) -> None:
        if event.get("event") != "epoch":
            await publish(channel_id, event)
    hub.apply_channel = lambda *args, **kwargs: None  # the rotation runs "elsewhere"
    hub.publish_channel_event = lost
    try:
        assert (await alice.rotate_epoch(channel))["epoch"] == 2
    finally:
        hub.apply_channel, hub.publish_channel_event = apply_channel, publish
    assert hub.rooms[channel].epoch == 1  # this process still believes epoch 1
    assert await alice.send(channel, "at epoch 2") == 2
    assert hub.rooms[channel].epoch == 2
    assert [m.text for m in await alice.history(channel)] == ["at epoch 1", "at epoch 2"]


async def test_a_late_read_of_the_record_never_takes_a_room_back_to_an_older_epoch(client, sdk_agents) -> None:
    """A channel event's re-read of the record can finish after a newer one (the epoch changes without
    a new membership version): the room stays at the newer epoch."""
    alice = await sdk_agents("alice")
    channel = await alice.create_channel([])
    await alice.send(channel, "hello")
    hub = client.server.app[HUB]
    old = dict(await client.server.app[RECORDS].get_channel(channel))
    await alice.rotate_epoch(channel)
    assert hub.rooms[channel].epoch == 2
    hub.apply_channel(old)  # the late read
    assert hub.rooms[channel].epoch == 2
    assert await alice.send(channel, "still at epoch 2") == 2
