"""/metrics: Prometheus text with the counters operators need, and who may read it."""

from __future__ import annotations

from prometheus_client.parser import text_string_to_metric_families

from agentchat.config import load_settings
from agentchat.server.app import build_app
from tests.server.test_rest import create_channel, envelope


def samples(text: str) -> dict[tuple[str, tuple], float]:
    found = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            found[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return found


async def test_metrics_count_messages_batches_and_store_operations(client, make_agent) -> None:
    alice, bob = await make_agent("alice"), await make_agent("bob")
    channel, key = await create_channel(alice, [bob])
    for i in range(20):
        status, _ = await alice.call("POST", f"/api/v1/channels/{channel}/messages",
                                     json={"client_id": f"m{i}", "envelope": envelope(alice, channel, key, "x", f"m{i}")})
        assert status == 201
    response = await client.get("/metrics")
    assert response.status == 200 and response.content_type == "text/plain"
    found = samples(await response.text())
    assert found[("agentchat_messages_in_total", ())] == 20
    assert found[("agentchat_batch_messages_count", ())] >= 1
    assert found[("agentchat_batch_messages_sum", ())] == 20
    assert found[("agentchat_store_operations_total", (("op", "put"),))] >= 20
    assert found[("agentchat_fanout_latency_seconds_count", ())] >= 1
    assert ("agentchat_sessions", ()) in found


async def test_metrics_token_is_required_when_configured(aiohttp_client, tmp_path) -> None:
    settings = load_settings(env={}, store=f"file://{tmp_path}/data", metrics_token="scrape-me")
    client = await aiohttp_client(build_app(settings))
    response = await client.get("/metrics")
    assert (await response.json())["error"]["code"] == "auth_required"
    response = await client.get("/metrics", headers={"Authorization": "Bearer wrong"})
    assert (await response.json())["error"]["code"] == "forbidden"
    response = await client.get("/metrics", headers={"Authorization": "Bearer scrape-me"})
    assert response.status == 200
