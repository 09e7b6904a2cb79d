"""A channel that is never for sale: unlisted at creation or later, it is absent from the public
indicators (REST and socket) and no peek can be opened on it."""

from __future__ import annotations

from typing import Any

from tests.server.test_frames_conformance import kind
from tests.server.test_indicators import eventually, public_socket
from tests.server.test_peeks import peeker_key
from tests.server.test_rest import create_channel


async def _listed_ids(client: Any) -> list[str]:
    response = await client.get("/api/v1/indicators", params={"sort": "channel"})
    assert response.status == 200
    return [item["channel"] for item in (await response.json())["channels"]]


async def _peek_answer(client: Any, channel: str) -> tuple[int, Any]:
    response = await client.post("/api/v1/peeks", json={"channel": channel, "peeker_public_key": peeker_key()[1]})
    return response.status, await response.json()


async def test_an_unlisted_channel_shows_nowhere_public_and_cannot_be_peeked(client, make_agent, sdk_agents) -> None:
    alice, bob = await make_agent("alice"), await make_agent("bob")
    listed, _ = await create_channel(alice, [bob])
    owner = await sdk_agents("owner")
    hidden = await owner.create_channel([], name="private", listed=False)
    assert (await owner.channel(hidden))["listed"] is False
    await eventually(lambda: _listed_ids(client), lambda ids: listed in ids)
    assert hidden not in await _listed_ids(client)
    response = await client.get(f"/api/v1/indicators/{hidden}")
    assert response.status == 404 and (await response.json())["error"]["code"] == "channel_not_found"
    watcher = await public_socket(client)
    await watcher.send({"type": "watch_indicators", "ref": "w", "channels": [listed, hidden]})
    answer = await watcher.wait_for(kind("indicators", ref="w"))
    assert [item["channel"] for item in answer["channels"]] == [listed]
    status, body = await _peek_answer(client, hidden)
    assert status == 403 and body["error"]["code"] == "channel_unlisted"
    # Listed again by its owner: on the market again (a peek needs an agent online to hand over the key)
    assert (await owner.set_listed(hidden, True))["listed"] is True
    await owner.connect()
    await eventually(lambda: _listed_ids(client), lambda ids: hidden in ids)
    assert (await _peek_answer(client, hidden))[0] == 201


async def test_the_owner_unlists_a_listed_channel_later_and_only_the_owner_may(client, make_agent) -> None:
    alice, bob = await make_agent("alice"), await make_agent("bob")
    channel, _ = await create_channel(alice, [bob])
    await eventually(lambda: _listed_ids(client), lambda ids: channel in ids)
    status, body = await bob.call("PATCH", f"/api/v1/channels/{channel}", json={"listed": False})
    assert status == 403 and body["error"]["code"] == "forbidden"
    status, body = await alice.call("PATCH", f"/api/v1/channels/{channel}", json={"listed": "no"})
    assert status == 400 and body["error"]["code"] == "invalid_field"
    status, body = await alice.call("PATCH", f"/api/v1/channels/{channel}", json={"listed": False})
    assert status == 200 and body["listed"] is False
    assert channel not in await _listed_ids(client)
    status, body = await _peek_answer(client, channel)
    assert status == 403 and body["error"]["code"] == "channel_unlisted"
