"""The agents, channels and sealed messages a workload sends, made once and cached on disk.

Every message is a real envelope (``agentchat.crypto.seal``: AES-256-GCM under the channel's epoch
key, signed by the sender) inside a ``send`` frame, with a client id unique to it (the server treats a
repeated client id as a retry, so the pool cannot be cycled). Sealing costs about 50-90 µs a message,
so the pool is made before the clock starts, in parallel, and kept under ``bench/results/cache``:
agents' keys and channel ids are fixed with it, and every fresh server of a later run accepts them
again (a channel's id is chosen by its creator, a DID is derived from the key).

The peers relay the very same frames, so every server carries the same bytes.
"""

from __future__ import annotations

import asyncio
import json
import os
import secrets
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import orjson

from agentchat import crypto
from agentchat.client.agent import encode_content

CACHE_VERSION = 1


def client_tag(index: int) -> str:
    """Prefix of every client id agent ``index`` sends: its relayed copies are recognisable."""
    return f"a{index:05d}m"


def plaintext_of(size: int, n: int) -> bytes:
    """An SDK content object (``{"kind":"text","body":...}``) of exactly ``size`` bytes."""
    head = encode_content("")
    fill = max(0, size - len(head))
    body = (f"{n:x}-" * (fill // 2 + 1))[:fill]
    return encode_content(body)


@dataclass
class FixtureAgent:
    index: int
    keys: crypto.AgentKeys
    channel: str

    @property
    def tag(self) -> str:
        return client_tag(self.index)


@dataclass
class Fixture:
    """``agents`` agents in channels of ``group``; ``frames_path(i)`` holds agent i's send frames."""

    directory: Path
    agents: list[FixtureAgent]
    channels: dict[str, dict[str, Any]]  # id -> {"members": [indexes], "epoch_key": bytes}
    per_agent: int

    def frames_path(self, index: int) -> Path:
        return self.directory / "frames" / f"agent-{index:05d}.frames"


def _seal_range(args: tuple[str, str, str, str, int, int, int, str]) -> None:
    """Worker: append sealed frames ``first..last-1`` of one agent to its frames file."""
    signing_hex, encryption_hex, channel, key_hex, first, last, size, path = args
    keys = crypto.AgentKeys.from_private_bytes(bytes.fromhex(signing_hex), bytes.fromhex(encryption_hex))
    epoch_key = bytes.fromhex(key_hex)
    index = int(Path(path).stem.split("-")[1])
    tag = client_tag(index)
    lines = []
    for n in range(first, last):
        client_id = f"{tag}{n:07d}"
        envelope = crypto.seal(epoch_key, plaintext_of(size, n), channel=channel, epoch=1, sender=keys.did,
                               client_id=client_id, signer=keys)
        lines.append(orjson.dumps({"type": "send", "channel": channel, "client_id": client_id,
                                   "envelope": envelope}))
    with open(path, "ab") as f:
        f.write(b"\n".join(lines) + b"\n")


def load_or_make(cache: Path, *, agents: int, group: int, payload: int, per_agent: int,
                 report: Any = None) -> Fixture:
    """The cached fixture for these sizes, with at least ``per_agent`` frames per agent (sealing the
    missing ones on every core). ``report(done, total)`` is called as agents are finished."""
    directory = cache / f"fanout-v{CACHE_VERSION}-a{agents}-g{group}-p{payload}"
    (directory / "frames").mkdir(parents=True, exist_ok=True)
    meta_path = directory / "fixture.json"
    if meta_path.exists():
        meta = json.loads(meta_path.read_text())
    else:
        meta = {"agents": [], "channels": {}, "per_agent": 0}
        for i in range(agents):
            signing, encryption = crypto.AgentKeys.generate().private_bytes()
            meta["agents"].append({"signing": signing.hex(), "encryption": encryption.hex()})
        for c in range(0, agents, group):
            channel = "ch_bench" + secrets.token_urlsafe(12)
            members = list(range(c, min(c + group, agents)))
            meta["channels"][channel] = {"members": members, "epoch_key": crypto.new_epoch_key().hex()}
            for i in members:
                meta["agents"][i]["channel"] = channel
        for path in (directory / "frames").glob("*.frames"):
            path.unlink()
    have = int(meta["per_agent"])
    if have < per_agent:
        channels = meta["channels"]
        tasks = [(a["signing"], a["encryption"], a["channel"], channels[a["channel"]]["epoch_key"], have,
                  per_agent, payload, str(directory / "frames" / f"agent-{i:05d}.frames"))
                 for i, a in enumerate(meta["agents"])]
        with ProcessPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
            for done, _ in enumerate(pool.map(_seal_range, tasks, chunksize=4), 1):
                if report is not None:
                    report(done, len(tasks))
        meta["per_agent"] = per_agent
        meta_path.write_text(json.dumps(meta))
    fixture_agents = [
        FixtureAgent(i, crypto.AgentKeys.from_private_bytes(bytes.fromhex(a["signing"]),
                                                            bytes.fromhex(a["encryption"])), a["channel"])
        for i, a in enumerate(meta["agents"])
    ]
    channels = {cid: {"members": c["members"], "epoch_key": bytes.fromhex(c["epoch_key"])}
                for cid, c in meta["channels"].items()}
    return Fixture(directory, fixture_agents, channels, int(meta["per_agent"]))


# ---------------------------------------------------------------------------------- REST set-up


class SetupError(RuntimeError):
    """The server refused a set-up request (registration, channel creation)."""


async def post_json(http: aiohttp.ClientSession, url: str, body: Any, token: str | None = None) -> dict[str, Any]:
    headers = {"Content-Type": "application/json"}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    for attempt in range(20):
        async with http.post(url, data=orjson.dumps(body), headers=headers) as response:
            raw = await response.read()
        if response.status == 429 or (response.status == 503 and attempt < 19):
            await asyncio.sleep(0.2)
            continue
        if response.status >= 400:
            raise SetupError(f"POST {url} -> {response.status}: {raw[:300].decode(errors='replace')}")
        return orjson.loads(raw)
    raise SetupError(f"POST {url}: still rate limited after 20 attempts")


async def register(http: aiohttp.ClientSession, base: str, keys: crypto.AgentKeys, name: str) -> str:
    """Register an agent exactly as the SDK does (``Agent.register``); returns its session token."""
    timestamp = int(time.time() * 1000)
    message = crypto.registration_message(name, keys.public, timestamp)
    result = await post_json(http, base + "/api/v1/agents/register", {
        "name": name, "keys": keys.public.to_wire(), "timestamp": timestamp,
        "signature": crypto.b64e(keys.sign(message))})
    return str(result["token"])


async def create_channel(http: aiohttp.ClientSession, base: str, token: str, channel: str,
                         members: list[crypto.AgentKeys], epoch_key: bytes) -> None:
    """Create ``channel`` with its first epoch key wrapped for every member (``Agent.create_channel``)."""
    wrapped = {m.did: crypto.wrap_epoch_key(epoch_key, m.public.encryption_key, channel=channel, epoch=1,
                                            recipient=m.did) for m in members}
    await post_json(http, base + "/api/v1/channels", {
        "id": channel, "name": "bench", "members": sorted(m.did for m in members), "epoch_keys": wrapped}, token)


async def setup_agentchat(base: str, fixture: Fixture | None, *, extra_agents: int = 0,
                          concurrency: int = 16) -> tuple[list[str], list[str]]:
    """Register the fixture's agents and create its channels on a fresh server at ``base``
    (``http://host:port``); also register ``extra_agents`` throw-away agents (idle, storm).
    Returns (tokens of the fixture's agents, tokens of the extra agents)."""
    limit = asyncio.Semaphore(concurrency)
    timeout = aiohttp.ClientTimeout(total=60)
    async with aiohttp.ClientSession(timeout=timeout,
                                     connector=aiohttp.TCPConnector(limit=concurrency)) as http:
        async def reg(keys: crypto.AgentKeys, name: str) -> str:
            async with limit:
                return await register(http, base, keys, name)

        tokens: list[str] = []
        if fixture is not None:
            tokens = list(await asyncio.gather(*(reg(a.keys, f"bench-{a.index}") for a in fixture.agents)))

            async def make(channel: str, info: dict[str, Any]) -> None:
                creator = info["members"][0]
                async with limit:
                    await create_channel(http, base, tokens[creator], channel,
                                         [fixture.agents[i].keys for i in info["members"]], info["epoch_key"])
                for invited in info["members"][1:]:  # the others were invited: they accept
                    async with limit:
                        await post_json(http, f"{base}/api/v1/invitations/{channel}/accept", {}, tokens[invited])

            await asyncio.gather(*(make(c, info) for c, info in fixture.channels.items()))
        extra = list(await asyncio.gather(*(reg(crypto.AgentKeys.generate(), f"idle-{i}")
                                            for i in range(extra_agents))))
    return tokens, extra
