"""The command line as a newcomer meets it: the console script run as a subprocess, its mistakes told in
one line with what to do (never a traceback), its help, and what it and the server print along the way."""

from __future__ import annotations

import concurrent.futures
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import IO

import pytest

from tests.e2e.processes import REPO, ServerProcess, free_port, run_cli

pytestmark = pytest.mark.slow


def agentchat(*args: str, env: dict[str, str] | None = None, cwd: Path = REPO,
              timeout: float = 30.0) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "agentchat", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, **(env or {})})


def assert_one_line(result: subprocess.CompletedProcess[str], *expected: str) -> None:
    """Failed, said so in one line on stderr, no traceback, and the line holds ``expected``."""
    assert result.returncode != 0, result
    assert "Traceback" not in result.stderr, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    for text in expected:
        assert text in lines[0], lines[0]


def test_key_file_mistakes_are_one_line_that_says_what_to_do(tmp_path: Path) -> None:
    garbage = tmp_path / "garbage.key"
    garbage.write_text("not a key\n")
    garbage.chmod(0o600)
    assert_one_line(agentchat("whoami", "--key", str(garbage)), "not an AgentChat key file", "keygen")
    assert_one_line(agentchat("whoami", "--key", str(tmp_path)), "is a directory")
    assert_one_line(agentchat("whoami", "--key", str(tmp_path / "missing.key")), "agentchat keygen --key")
    shared = tmp_path / "shared.key"
    assert agentchat("keygen", "--key", str(shared)).returncode == 0
    assert_one_line(agentchat("keygen", "--key", str(shared)), "exists", "--force")
    shared.chmod(0o644)
    assert_one_line(agentchat("send", "ch_x", "hi", "--key", str(shared)), f"chmod 600 {shared}")


def test_server_mistakes_are_one_line_that_says_what_to_do(tmp_path: Path) -> None:
    key = tmp_path / "a.key"
    assert agentchat("keygen", "--key", str(key)).returncode == 0
    assert_one_line(agentchat("register", "a", "--key", str(key), "--server", "127.0.0.1:8080"),
                    "http://127.0.0.1:8080")
    closed = f"http://127.0.0.1:{free_port()}"
    assert_one_line(agentchat("register", "a", "--key", str(key), "--server", closed),
                    f"cannot reach {closed}", "agentchat serve")
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = str(taken.getsockname()[1])
        served = agentchat("serve", "--port", port, "--store", f"file://{tmp_path}/data")
        # serve logs its start-up (a new token secret, say) before it binds: the mistake is the last line
        assert served.returncode == 1 and "Traceback" not in served.stderr, served.stderr
        last = served.stderr.strip().splitlines()[-1]
        assert f"cannot listen on 127.0.0.1:{port}" in last and "address already in use" in last and "--port" in last
    # The s3 store without its extra installed (aiobotocore hidden from the import system).
    hidden = subprocess.run(
        [sys.executable, "-c", "import sys; sys.modules['aiobotocore'] = None; from agentchat.__main__ import main; "
         "sys.exit(main(['serve', '--store', 's3://bucket?endpoint=http://127.0.0.1:9']))"],
        cwd=REPO, capture_output=True, text=True, timeout=30)
    assert_one_line(hidden, "'s3' extra", "pip install 'agentchat[s3]'")


def test_help_describes_each_command_and_offers_only_what_it_uses() -> None:
    top = agentchat("--help")
    assert top.returncode == 0 and "examples:" in top.stdout
    assert re.search(r"\n +keygen +make a new agent key file", top.stdout), top.stdout
    version = agentchat("--version")
    assert version.returncode == 0 and version.stdout.startswith("agentchat ")
    keygen = agentchat("keygen", "--help").stdout
    assert "--server" not in keygen and "--key" in keygen and "example:" in keygen
    assert "--server" not in agentchat("whoami", "--help").stdout
    peek = agentchat("peek", "--help").stdout
    assert "--key" not in peek and "--server" in peek
    assert "the channel id (ch_...)" in peek and "Peek at a channel as a human would" in peek
    assert "the name others see" in agentchat("register", "--help").stdout


def test_a_first_session_reads_like_it_should(tmp_path: Path) -> None:
    """The quick start with the CLI's own variables exported: serve starts anyway and logs what happens;
    names appear next to short DIDs; a listener says when it reconnects and never repeats old messages;
    a peek and the ledger speak dollars and dates; Ctrl-C stops the server with a line."""
    log = tmp_path / "server.log"
    port = free_port()
    cli_env = {"AGENTCHAT_SERVER": f"http://127.0.0.1:{port}", "AGENTCHAT_KEY": str(tmp_path / "default.key")}
    server = ServerProcess(store=f"file://{tmp_path}/data", port=port, log_path=log,
                           env={**cli_env, "AGENTCHAT_PEEK_REFUSAL_WINDOW_SECONDS": "1"})
    server.start()
    listener: subprocess.Popen[str] | None = None
    try:
        alice, bob = tmp_path / "alice.key", tmp_path / "bob.key"
        url = server.url
        alice_did = run_cli("keygen", server=url, key=alice).stdout.strip()
        bob_did = run_cli("keygen", server=url, key=bob).stdout.strip()
        registered = run_cli("register", "alice", server=url, key=alice)
        assert registered.stdout.strip() == alice_did
        assert f"registered alice (…{alice_did[-6:]})" in registered.stderr
        assert run_cli("register", "bob", server=url, key=bob).returncode == 0
        assert run_cli("register", "bob", server=url, key=bob).returncode == 0  # again, same name: harmless
        renamed = run_cli("register", "robert", server=url, key=bob)
        assert_one_line(renamed, "registered as 'bob', not 'robert'", "--rename")
        channel = run_cli("channel", "create", "--member", bob_did, server=url, key=alice).stdout.strip()
        assert_one_line(run_cli("send", "ch_doesnotexist", "hi", server=url, key=alice),
                        "no channel ch_doesnotexist", "channel list")
        for text in ("one", "two"):
            assert run_cli("send", channel, text, server=url, key=alice).returncode == 0
        history = run_cli("history", channel, server=url, key=bob).stdout
        assert f"#1] alice (…{alice_did[-6:]}): one" in history
        assert f"bob (…{bob_did[-6:]})" in run_cli("channel", "list", server=url, key=alice).stdout

        listener = subprocess.Popen([sys.executable, "-m", "agentchat", "listen", "--key", str(bob), "--server", url],
                                    cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                    env={**os.environ, **cli_env})
        assert listener.stderr is not None and listener.stdout is not None
        assert "listening as bob" in listener.stderr.readline()
        server.stop()
        assert "connection lost; reconnecting…" in listener.stderr.readline()
        server.start()
        assert listener.stderr.readline().strip() == "reconnected"
        assert run_cli("send", channel, "three", server=url, key=alice).returncode == 0
        assert listener.stdout.readline().strip() == f"[{channel} #3] alice (…{alice_did[-6:]}): three", \
            "a listener prints what is said after it started, never the older messages again"

        peek = agentchat("peek", channel, "--count", "1", env=cli_env, timeout=60)
        assert "Traceback" not in peek.stderr, peek.stderr
        assert "costs $5.00" in peek.stderr and "cents" not in peek.stderr and "  " not in peek.stderr.replace("  \n", "\n")
        assert "You were charged $5.00" in peek.stderr and "awaiting_payment" not in peek.stderr
        declined = agentchat("peek", channel, "--decline", env=cli_env, timeout=60)
        assert "The payment did not go through: the card was declined" in declined.stderr and "You were not charged" in declined.stderr
        ledger = run_cli("ledger", server=url, key=bob).stdout
        assert "balance $1.75" in ledger and "peek share" in ledger and "+$1.75" in ledger
        assert time.strftime("%Y-%m-%d") in ledger
        listener.send_signal(signal.SIGINT)
        listener.wait(10)
        heard = listener.stderr.read()
        assert "a human asks to peek at" in heard and "costs $1.00" in heard and " ms" not in heard
        assert "active: the human reads the conversation" in heard
        assert listener.stdout.read() == "", "nothing more was said"

        renamed = run_cli("register", "robert", "--rename", server=url, key=bob)
        assert renamed.returncode == 0 and "registered robert" in renamed.stderr
        assert f"robert (…{bob_did[-6:]})" in run_cli("channel", "list", server=url, key=alice).stdout

        assert server.process is not None
        server.process.send_signal(signal.SIGINT)  # Ctrl-C
        assert server.process.wait(15) == 0
    finally:
        if listener is not None and listener.poll() is None:
            listener.kill()
        server.close()
    said = log.read_text()
    assert "Traceback" not in said
    assert said.count("AgentChat listening on http://127.0.0.1:") == 2
    assert f"agent registered: alice {alice_did}" in said and f"agent registered: bob {bob_did}" in said
    assert "agent registered: robert" not in said and f"agent renamed: bob -> robert {bob_did}" in said
    assert " opened on " in said and ": active: paid, 500 cents captured" in said and "payment_failed" in said
    assert said.rstrip().endswith("stopped")


def next_line(stream: IO[str], seconds: float = 30.0) -> str:
    """The next line a child process writes, within ``seconds`` (a missing line fails the test there
    rather than hanging it)."""
    pool = concurrent.futures.ThreadPoolExecutor(1)
    try:
        return pool.submit(stream.readline).result(seconds).strip()
    finally:
        pool.shutdown(wait=False)  # a read still waiting ends when the process is killed


def test_a_listener_says_which_invitations_it_accepted(tmp_path: Path) -> None:
    """One line on stderr for each invitation a listener accepts, whether it was waiting when the
    listener started or arrives while it listens; a channel the agent created itself is not one."""
    server = ServerProcess(store=f"file://{tmp_path}/data", log_path=tmp_path / "server.log").start()
    listener: subprocess.Popen[str] | None = None
    try:
        url, alice, bob = server.url, tmp_path / "alice.key", tmp_path / "bob.key"
        alice_did = run_cli("keygen", server=url, key=alice).stdout.strip()
        bob_did = run_cli("keygen", server=url, key=bob).stdout.strip()
        assert run_cli("register", "alice", server=url, key=alice).returncode == 0
        assert run_cli("register", "bob", server=url, key=bob).returncode == 0
        waiting = run_cli("channel", "create", "--member", bob_did, "--name", "plans", server=url, key=alice).stdout.strip()
        listener = subprocess.Popen([sys.executable, "-m", "agentchat", "listen", "--key", str(bob), "--server", url],
                                    cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        assert listener.stderr is not None and listener.stdout is not None
        assert "listening as bob" in next_line(listener.stderr)
        inviter = f"alice (…{alice_did[-6:]})"
        assert next_line(listener.stderr) == \
            f"accepted the invitation to {waiting} ('plans') from {inviter}; its messages follow"
        assert run_cli("channel", "create", server=url, key=bob).returncode == 0  # bob's own: nothing to say
        live = run_cli("channel", "create", "--member", bob_did, server=url, key=alice).stdout.strip()
        assert next_line(listener.stderr) == f"accepted the invitation to {live} from {inviter}; its messages follow"
        assert run_cli("send", live, "hello", server=url, key=alice).returncode == 0
        assert next_line(listener.stdout) == f"[{live} #1] {inviter}: hello"
        listener.send_signal(signal.SIGINT)
        listener.wait(10)
        assert "accepted" not in listener.stderr.read(), "one line per invitation"
    finally:
        if listener is not None and listener.poll() is None:
            listener.kill()
        server.close()
