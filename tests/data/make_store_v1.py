"""Make ``tests/data/store-v1/``: a small store written by this release, kept so that every later
release proves it still serves it (``tests/lifecycle/test_upgrade.py``).

    PYTHONPATH=$PWD python -m tests.data.make_store_v1      # rewrites tests/data/store-v1*

It drives a real server process the way users do: three agents, a channel whose members change (so it
has several epochs), messages of text and JSON, a paid peek (its ledger entries, and the epoch its end
starts), a peek left awaiting payment. It stops the server cleanly (the messages so far go to
segments), starts it again, sends more, and kills it: those last messages stay in write-ahead batches
only. What a reader must see afterwards goes to ``store-v1.json`` with the agents' key files.

Never run it again for the same name: the point of the data is that it was written by the old code.
A later format gets its own ``store-v2`` next to this one.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

from agentchat import crypto
from agentchat.client import Agent
from agentchat.client.peeker import Peeker
from tests.e2e.processes import ServerProcess

HERE = Path(__file__).resolve().parent
NAME = "store-v1"
ENV = {"AGENTCHAT_TOKEN_SECRET": "", "AGENTCHAT_PEEK_REFUSAL_WINDOW_SECONDS": "1",
       "AGENTCHAT_PEEK_DURATION_SECONDS": "2", "AGENTCHAT_PEEK_SCAN_SECONDS": "0.2"}


def store_files(root: Path) -> list[Path]:
    """The store's objects (not its lock file nor a write left half-done)."""
    return sorted(p for p in root.rglob("*") if p.is_file() and p.name.endswith(",obj"))


async def next_kind(events: Any, kind: str, timeout: float = 20.0) -> Any:
    async def find() -> Any:
        async for event in events:
            if event.kind == kind:
                return event
        raise RuntimeError(f"no {kind} event")
    return await asyncio.wait_for(find(), timeout)


async def generate(work: Path) -> dict[str, Any]:
    store = work / "store"
    keys = {name: crypto.AgentKeys.generate() for name in ("alice", "bob", "carol")}
    server = ServerProcess(store=f"file://{store}", env=ENV, log_path=work / "server.log").start()
    said: list[tuple[str, Any]] = []  # (sender name, content), in the order acked
    try:
        alice, bob, carol = (Agent(server.url, keys[n]) for n in ("alice", "bob", "carol"))
        for name, agent in zip(("alice", "bob", "carol"), (alice, bob, carol)):
            await agent.register(name)
        channel = await alice.create_channel([bob.did], name="upgrade-v1")

        async def say(name: str, agent: Agent, content: Any) -> None:
            await agent.send(channel, content)
            said.append((name, content))

        await say("alice", alice, "hello bob, epoch 1")
        await say("bob", bob, {"task": "summarise", "url": "https://example.org/a", "n": 1})
        await say("alice", alice, "third message")
        await alice.add_member(channel, carol.did)  # epoch 2
        await say("carol", carol, "carol joins in epoch 2")
        await say("bob", bob, ["a", "list", 2])
        for agent in (alice, bob, carol):
            await agent.connect()
        async with Peeker(server.url) as peeker:
            await peeker.open(channel)
            await peeker.connect()
            events = peeker.events()
            await peeker.confirm()
            await next_kind(events, "grant")
            await next_kind(events, "closed")
        for _ in range(100):  # one of the members starts epoch 3 when the peek ends
            if (await alice.channel(channel))["epoch"] >= 3:
                break
            await asyncio.sleep(0.1)
        await say("alice", alice, "after the peek, epoch 3")
        async with Peeker(server.url) as waiting:
            await waiting.open(channel)  # left awaiting payment
        for agent in (alice, bob, carol):
            await agent.close()
        server.stop()  # clean: everything so far is compacted into segments

        server.start()
        alice, bob = Agent(server.url, keys["alice"]), Agent(server.url, keys["bob"])
        await alice.login()
        await bob.login()
        await say("bob", bob, "written after the restart")
        await say("alice", alice, {"last": True})
        ledgers = {}
        for name in ("alice", "bob", "carol"):
            async with Agent(server.url, keys[name]) as agent:
                found = await agent.ledger()
                ledgers[name] = {"balance_cents": found["balance_cents"], "entries": found["entries"]}
        history = [{"seq": m.seq, "sender": m.sender, "kind": m.kind, "content": m.content}
                   for m in await alice.history(channel, limit=100)]
        meta = await alice.channel(channel)
        await alice.close()
        await bob.close()
        server.kill()  # the last two messages stay in write-ahead batches only
    finally:
        server.close()
    assert [h["content"] for h in history] == [content for _, content in said], history
    assert any(p.parts[-3] == "wal" for p in store_files(store)), "no write-ahead batch left"
    assert any(p.parts[-2] == "txns" or "ledger" in p.parts for p in store_files(store)), "no ledger"
    return {
        "channel": channel, "name": "upgrade-v1", "owner": meta["owner"], "members": meta["members"],
        "epoch": meta["epoch"], "history": history, "ledgers": ledgers,
        "agents": {name: {"did": k.did} for name, k in keys.items()},
    }, keys


def main() -> int:
    target = HERE / NAME
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        expected, keys = asyncio.run(generate(work))
        shutil.rmtree(target, ignore_errors=True)
        source = work / "store"
        for path in store_files(source):
            dest = target / path.relative_to(source)
            dest.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(path, dest)
    # The test agents' keys, in one JSON file rather than key files (the repository keeps none).
    identities: dict[str, Any] = {"about": f"Throwaway test agents of tests/data/{NAME} (made by make_store_v1.py); "
                                           "never real keys. Tests write each to a 0600 key file.", "agents": {}}
    for name, k in keys.items():
        k.save(work_keys := Path(tempfile.mkdtemp()) / "agent.key")
        identities["agents"][name] = json.loads(work_keys.read_text())
        shutil.rmtree(work_keys.parent)
    (HERE / f"{NAME}-identities.json").write_text(json.dumps(identities, indent=1, sort_keys=True) + "\n")
    (HERE / f"{NAME}.json").write_text(json.dumps(expected, indent=1, sort_keys=True) + "\n")
    print(f"wrote {target} ({len(store_files(target))} objects) and {NAME}.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
