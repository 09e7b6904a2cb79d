"""What only the directory store does: its files, and conditional writes from several processes."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

from agentchat.store.local import LocalStore

_INCREMENTER = textwrap.dedent(
    """
    import asyncio, sys
    from agentchat.store.base import PreconditionFailed
    from agentchat.store.local import LocalStore

    async def main(root, times):
        store = LocalStore(root)
        await store.start()
        for _ in range(times):
            while True:
                current = await store.get("counter")
                try:
                    await store.put("counter", str(int(current.data) + 1).encode(), if_match=current.etag)
                    break
                except PreconditionFailed:
                    pass
        await store.close()

    asyncio.run(main(sys.argv[1], int(sys.argv[2])))
    """
)


async def test_if_match_across_processes_loses_no_update(tmp_path: Path) -> None:
    store = LocalStore(tmp_path)
    await store.start()
    await store.put("counter", b"0")
    processes, times = 3, 15
    children = [
        subprocess.Popen([sys.executable, "-c", _INCREMENTER, str(tmp_path), str(times)])
        for _ in range(processes)
    ]
    for child in children:
        assert child.wait(timeout=60) == 0
    got = await store.get("counter")
    assert got is not None and got.data == str(processes * times).encode()
    await store.close()


async def test_files_on_disk(tmp_path: Path) -> None:
    store = LocalStore(tmp_path)
    await store.start()
    await store.put("messages/ch1/0001", b"segment")
    await store.put("messages/ch1", b"meta")
    assert (tmp_path / "messages" / "ch1" / "0001,obj").read_bytes() == b"segment"
    assert (tmp_path / "messages" / "ch1,obj").read_bytes() == b"meta"
    # Leftovers of a crash in the middle of a write are never listed or read.
    (tmp_path / "messages" / "ch1" / ",tmp.0123abcd").write_bytes(b"half")
    assert await store.list("") == ["messages/ch1", "messages/ch1/0001"]
    await store.delete("messages/ch1/0001")
    await store.delete("messages/ch1")
    assert await store.list("") == []
    await store.close()


async def test_deleting_the_last_object_removes_empty_directories(tmp_path: Path) -> None:
    store = LocalStore(tmp_path)
    await store.start()
    await store.put("a/b/c/d", b"x")
    await store.put("a/e", b"y")
    await store.delete("a/b/c/d")
    assert not (tmp_path / "a" / "b").exists()
    assert (tmp_path / "a" / "e,obj").exists()
    await store.put("a/b/c/d", b"again")  # and the directories come back when needed
    assert (await store.get("a/b/c/d")).data == b"again"  # type: ignore[union-attr]
    await store.close()


async def test_files_are_private_to_the_servers_user(tmp_path: Path) -> None:
    import os
    import stat

    root = tmp_path / "data"
    root.mkdir(mode=0o755)
    os.chmod(root, 0o755)  # as an earlier version, or an operator, left it
    store = LocalStore(root)
    await store.start()
    try:
        await store.put("ledger/accounts/platform/capture/pk_1", b"{}")
        await store.put("ledger/txns/capture/pk_1.json", b"{}", if_none_match=True)
        modes = {path.relative_to(root).as_posix(): stat.S_IMODE(path.stat().st_mode) for path in root.rglob("*")}
        assert stat.S_IMODE(root.stat().st_mode) == 0o700
        assert {p: m for p, m in modes.items() if (root / p).is_dir()} == dict.fromkeys(
            ["ledger", "ledger/accounts", "ledger/accounts/platform", "ledger/accounts/platform/capture",
             "ledger/txns", "ledger/txns/capture"], 0o700)
        assert {p: m for p, m in modes.items() if (root / p).is_file()} == dict.fromkeys(
            [",lock", "ledger/accounts/platform/capture/pk_1,obj", "ledger/txns/capture/pk_1.json,obj"], 0o600)
    finally:
        await store.close()
