"""One load generator process: ``python -m bench.loadgen JOB.json``.

The orchestrator (``bench.cli``) starts several of these, pinned to the load cores, each with a job
file naming its clients. A process speaks one of three protocols to the server under test:

- ``agentchat``: ``hello`` with the agent's token, ``welcome``, then pre-sealed ``send`` frames;
  the window is released by ``ack`` frames; a server message may carry several frames separated by
  newlines;
- ``ws``: the raw relay peers: a first message names the room (answered ``joined``), then every
  message is relayed to the room; the sender's own copy releases its window;
- ``socketio``: Engine.IO 4 / Socket.IO 5 over a WebSocket (``40`` connect, ``42["join",room]`` with
  an ack, ``42["m",frame]`` events, answering the server's ``2`` pings with ``3``).

Every client of one channel lives in the same process, so the end-to-end latency of a delivery is
measured on one monotonic clock: the time the frame was sent (looked up by its client id) to the
time each member received it.

The process talks JSON lines on stdout (``ready``, ``progress``, ``result``) and reads commands on
stdin (``go <unix time>``, ``stop``). The hot path is picows callbacks: no task per message.
"""

from __future__ import annotations

import array
import asyncio
import json
import os
import resource
import socket
import sys
import time
from dataclasses import dataclass, field
from itertools import cycle
from typing import Any
from urllib.parse import urlsplit

from picows import WSListener, WSMsgType, ws_connect

from bench.stats import Histogram

CID_MARK = b'"client_id":"'
# Linux: pick the source port at connect() time, by the full 4-tuple, so a bound source address
# is not limited to ports that are free towards every destination (TIME_WAIT sockets of earlier runs).
IP_BIND_ADDRESS_NO_PORT = getattr(socket, "IP_BIND_ADDRESS_NO_PORT", 24)
PROGRESS_SECONDS = 0.5


def client_id_of(frame: bytes | memoryview, start: int = 0) -> bytes | None:
    """The client id inside a JSON frame (send, message, ack, or a peer's relayed copy)."""
    data = bytes(frame) if isinstance(frame, memoryview) else frame
    at = data.find(CID_MARK, start)
    if at < 0:
        return None
    at += len(CID_MARK)
    return data[at:data.index(b'"', at)]


def socketio_event(payload: bytes) -> bytes:
    """A Socket.IO ``m`` event carrying ``payload`` (a JSON object) as its argument."""
    return b'42["m",' + payload + b"]"


@dataclass
class Shared:
    """State of one generator process that every client's callbacks touch."""

    measuring: bool = False
    sending: bool = False
    delivered_total: int = 0
    delivered: int = 0
    sent: int = 0
    acked: int = 0
    errors: int = 0
    first_error: str = ""
    exhausted: int = 0
    sent_at: dict[bytes, float] = field(default_factory=dict)
    latencies: array.array = field(default_factory=lambda: array.array("d"))
    disconnected: int = 0


class Client(WSListener):
    """One socket of the load: connects, becomes ready (authenticated / joined), then sends its
    frames under a window and records every delivery."""

    def __init__(self, spec: dict[str, Any], protocol: str, shared: Shared, window: int,
                 frames: list[bytes], saturate: bool) -> None:
        super().__init__()
        self.spec = spec
        self.protocol = protocol
        self.shared = shared
        self.window = window
        self.frames = frames
        self.next_frame = 0
        self.saturate = saturate
        self.inflight = 0
        self.tag = spec.get("tag", "").encode()
        self.ready: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.connect_started = 0.0
        self.connect_seconds = 0.0
        self.transport: Any = None
        self._partial: list[bytes] = []

    # ------------------------------------------------------------------------------ handshake

    def on_ws_connected(self, transport: Any) -> None:
        self.transport = transport
        if self.protocol == "agentchat":
            transport.send(WSMsgType.TEXT, json.dumps({"type": "hello", "token": self.spec["token"]}).encode())
        elif self.protocol == "ws":
            transport.send(WSMsgType.TEXT, self.spec.get("room", "lobby").encode())
        # socketio: wait for the Engine.IO open packet

    def _became_ready(self) -> None:
        if not self.ready.done():
            self.connect_seconds = time.perf_counter() - self.connect_started
            self.ready.set_result(None)

    def _fail(self, reason: str) -> None:
        shared = self.shared
        shared.errors += 1
        if not shared.first_error:
            shared.first_error = reason[:300]
        if not self.ready.done():
            self.ready.set_exception(ConnectionError(reason[:300]))

    def on_ws_disconnected(self, transport: Any) -> None:
        self.shared.disconnected += 1
        if not self.ready.done():
            self.ready.set_exception(ConnectionError("disconnected before it was ready"))

    # ------------------------------------------------------------------------------ frames

    def on_ws_frame(self, transport: Any, frame: Any) -> None:
        kind = frame.msg_type
        if kind == WSMsgType.CLOSE:
            if not self.ready.done():
                self._fail(f"closed {frame.get_close_code()}: {frame.get_close_message()!r}")
            return
        if kind not in (WSMsgType.TEXT, WSMsgType.BINARY, WSMsgType.CONTINUATION):
            return
        data = frame.get_payload_as_bytes()
        if not frame.fin:
            self._partial.append(data)
            return
        if self._partial:
            self._partial.append(data)
            data = b"".join(self._partial)
            self._partial = []
        if self.protocol == "agentchat":
            self._on_agentchat(data)
        elif self.protocol == "ws":
            self._on_relay(data)
        else:
            self._on_socketio(data)

    def _on_agentchat(self, data: bytes) -> None:
        for line in data.split(b"\n") if b"\n" in data else (data,):
            if line.startswith(b'{"type":"message"'):
                self._delivered(line)
            elif line.startswith(b'{"type":"ack"'):
                self.shared.acked += 1
                self._release()
            elif line.startswith(b'{"type":"welcome"'):
                self._became_ready()
            elif line.startswith(b'{"type":"error"'):
                self._fail(line.decode(errors="replace"))

    def _on_relay(self, data: bytes) -> None:
        if not self.ready.done():
            if data == b"joined":
                self._became_ready()
            return
        cid = self._delivered(data)
        if cid is not None and cid.startswith(self.tag):
            self._release()

    def _on_socketio(self, data: bytes) -> None:
        if data.startswith(b'42["m",'):
            cid = self._delivered(data)
            if cid is not None and cid.startswith(self.tag):
                self._release()
        elif data == b"2":
            self.transport.send(WSMsgType.TEXT, b"3")
        elif data.startswith(b"0{"):
            self.transport.send(WSMsgType.TEXT, b"40")
        elif data.startswith(b"40"):
            room = json.dumps(self.spec.get("room", "lobby")).encode()
            self.transport.send(WSMsgType.TEXT, b'420["join",' + room + b"]")
        elif data.startswith(b"430"):
            self._became_ready()
        elif data.startswith(b"44"):
            self._fail("socket.io connect error: " + data.decode(errors="replace"))

    # ------------------------------------------------------------------------------ load

    def _delivered(self, data: bytes) -> bytes | None:
        shared = self.shared
        shared.delivered_total += 1
        cid = client_id_of(data)
        if shared.measuring:
            shared.delivered += 1
            if cid is not None:
                sent = shared.sent_at.get(cid)
                if sent is not None:
                    shared.latencies.append(time.perf_counter() - sent)
        return cid

    def _release(self) -> None:
        self.inflight -= 1
        if self.saturate and self.shared.sending:
            self.send_next()

    def send_next(self) -> bool:
        """Send this client's next frame if its window has room; False when it cannot."""
        if self.inflight >= self.window or self.transport is None:
            return False
        index = self.next_frame
        if index >= len(self.frames):
            if index == len(self.frames):
                self.shared.exhausted += 1
                self.next_frame += 1
            return False
        self.next_frame = index + 1
        payload = self.frames[index]
        shared = self.shared
        cid = client_id_of(payload)
        if cid is not None:
            shared.sent_at[cid] = time.perf_counter()
        if self.protocol == "socketio":
            payload = socketio_event(payload)
        self.transport.send(WSMsgType.TEXT, payload)
        self.inflight += 1
        if shared.measuring:
            shared.sent += 1
        return True

    def fill_window(self) -> None:
        while self.send_next():
            pass


# ---------------------------------------------------------------------------------- the process


def emit(event: str, **fields: Any) -> None:
    sys.stdout.write(json.dumps({"event": event, **fields}) + "\n")
    sys.stdout.flush()


def load_frames(path: str | None) -> list[bytes]:
    """A client's pre-made frames, one per line. Client ids start with the client's ``tag``, so a
    peer's relayed copy tells its sender that the message went round (AgentChat acks instead)."""
    if not path:
        return []
    with open(path, "rb") as f:
        return [line for line in f.read().split(b"\n") if line]


def bound_socket_factory(source: str, host: str, port: int) -> Any:
    """A picows ``socket_factory``: a TCP socket from ``source`` (a 127.0.0.x address) to host:port."""
    async def make(_parsed_url: object) -> socket.socket:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setblocking(False)
        try:
            sock.setsockopt(socket.SOL_IP, IP_BIND_ADDRESS_NO_PORT, 1)
            sock.bind((source, 0))
            await asyncio.get_running_loop().sock_connect(sock, (host, port))
        except BaseException:
            sock.close()
            raise
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return sock
    return make


async def connect_all(job: dict[str, Any], shared: Shared, saturate: bool) -> tuple[list[Client], list[str]]:
    protocol = job["protocol"]
    url = job["url"]
    window = int(job.get("window", 16))
    sources = job.get("source_ips") or [None]
    concurrency = int(job.get("connect_concurrency", 100))
    limit = asyncio.Semaphore(concurrency)
    clients: list[Client] = []
    failures: list[str] = []
    source_cycle = cycle(sources)

    async def one(spec: dict[str, Any], source: str | None) -> None:
        frames = load_frames(spec.get("frames"))
        client = Client(spec, protocol, shared, window, frames, saturate)
        async with limit:
            client.connect_started = time.perf_counter()
            kwargs: dict[str, Any] = {}
            target = spec.get("url") or url
            if source:
                parsed = urlsplit(target)
                kwargs["socket_factory"] = bound_socket_factory(source, parsed.hostname or "127.0.0.1",
                                                                parsed.port or 80)
            try:
                await ws_connect(lambda: client, target, max_frame_size=1 << 24, websocket_handshake_timeout=30,
                                 **kwargs)
                await asyncio.wait_for(client.ready, 30)
            except Exception as exc:  # counted and reported; the run goes on with the others
                failures.append(f"{type(exc).__name__}: {exc}"[:300])
                return
        clients.append(client)

    await asyncio.gather(*(one(spec, next(source_cycle)) for spec in job["clients"]))
    return clients, failures


async def hold_sessions(job: dict[str, Any]) -> tuple[list[Any], list[str], Histogram]:
    """Idle and storm: open every session of the job with the lean client (``bench.sessions``)."""
    from bench.sessions import open_session

    limit = asyncio.Semaphore(int(job.get("connect_concurrency", 100)))
    sources = cycle(job.get("source_ips") or [None])
    held: list[Any] = []
    failures: list[str] = []
    hist = Histogram()

    async def one(spec: dict[str, Any], source: str | None) -> None:
        async with limit:
            try:
                session, seconds = await open_session(job["protocol"], spec.get("url") or job["url"], spec, source)
            except Exception as exc:  # counted and reported
                failures.append(f"{type(exc).__name__}: {exc}"[:300])
                return
        held.append(session)
        hist.record(seconds * 1e6)

    await asyncio.gather(*(one(spec, next(sources)) for spec in job["clients"]))
    return held, failures, hist


async def read_command(reader: asyncio.StreamReader) -> list[str]:
    line = await reader.readline()
    return line.decode().split() or ["stop"]


async def run(job: dict[str, Any]) -> None:
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    shared = Shared()
    mode = job["mode"]
    rate = job.get("rate")  # messages per second for this process; None: as fast as the window allows
    saturate = mode == "fanout" and not rate
    if mode in ("idle", "storm"):
        if mode == "storm":  # the clock starts at "go"
            emit("ready", clients=0, failures=0, first_failure="")
            await read_command(reader)
        started = time.perf_counter()
        cpu_started = time.process_time()
        held, failures, hist = await hold_sessions(job)
        summary = {"clients": len(held), "failures": len(failures),
                   "first_failure": failures[0] if failures else "",
                   "connect_seconds": time.perf_counter() - started,
                   "cpu_seconds": time.process_time() - cpu_started, "connect_latency": hist.to_json()}
        if mode == "idle":
            emit("ready", **summary)
            await read_command(reader)  # go: the orchestrator measures the server meanwhile
        emit("result", disconnected=sum(1 for h in held if h.closed), **summary)
        await read_command(reader)
        for h in held:
            h.close()
        return
    started = time.perf_counter()
    clients, failures = await connect_all(job, shared, saturate)
    connect_elapsed = time.perf_counter() - started
    connect_hist = Histogram()
    for client in clients:
        connect_hist.record(client.connect_seconds * 1e6)
    emit("ready", clients=len(clients), failures=len(failures), first_failure=failures[0] if failures else "",
         connect_seconds=connect_elapsed, connect_latency=connect_hist.to_json())
    command = await read_command(reader)
    if command[0] != "go":
        emit("result", errors=shared.errors, first_error=shared.first_error, disconnected=shared.disconnected)
        return
    start_at = float(command[1])
    warmup, duration = float(job["warmup"]), float(job["duration"])
    start = time.perf_counter() + (start_at - time.time())
    measure_from, measure_to = start + warmup, start + warmup + duration
    await asyncio.sleep(max(0.0, start - time.perf_counter()))
    shared.sending = True
    cpu_start = [0.0]
    if saturate:
        for client in clients:
            client.fill_window()
    else:
        loop.create_task(pace(clients, shared, float(rate), measure_to))

    def begin_measuring() -> None:
        shared.measuring = True
        shared.latencies = array.array("d")
        cpu_start[0] = time.process_time()

    loop.call_at(loop.time() + (measure_from - time.perf_counter()), begin_measuring)
    while time.perf_counter() < measure_to:
        await asyncio.sleep(min(PROGRESS_SECONDS, max(0.0, measure_to - time.perf_counter())))
        emit("progress", delivered=shared.delivered_total)
    shared.measuring = False
    shared.sending = False
    measured_seconds = time.perf_counter() - measure_from
    cpu_seconds = time.process_time() - cpu_start[0]
    delivered, sent = shared.delivered, shared.sent
    latencies = shared.latencies
    hist = Histogram()
    hist.record_many(value * 1e6 for value in latencies)
    emit("result", delivered=delivered, sent=sent, acked=shared.acked, seconds=measured_seconds,
         cpu_seconds=cpu_seconds, errors=shared.errors, first_error=shared.first_error,
         exhausted=shared.exhausted, disconnected=shared.disconnected, latency=hist.to_json(),
         clients=len(clients))
    await read_command(reader)


async def pace(clients: list[Client], shared: Shared, rate: float, until: float) -> None:
    """Send ``rate`` messages per second spread evenly over the clients (round robin), checking the
    schedule every millisecond; a client whose window is full is skipped (the achieved rate shows it)."""
    if not clients:
        return
    begin = time.perf_counter()
    done = 0
    turn = 0
    n = len(clients)
    while shared.sending and time.perf_counter() < until:
        due = int((time.perf_counter() - begin) * rate) - done
        tries = 0
        while due > 0 and tries < n:
            client = clients[turn]
            turn = (turn + 1) % n
            if client.send_next():
                done += 1
                due -= 1
                tries = 0
            else:
                tries += 1
        if tries >= n:  # every window is full: skip what is due rather than bunch it up later
            done = int((time.perf_counter() - begin) * rate)
        await asyncio.sleep(0.001)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    with open(argv[0], encoding="utf-8") as f:
        job = json.load(f)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    try:
        import uvloop

        uvloop.run(run(job))
    except ImportError:
        asyncio.run(run(job))
    return 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
