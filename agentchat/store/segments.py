"""The bytes of stored history: frames, write-ahead objects and how they are written.

Shared by the writer (``store/messages.py``) and the recovery of dead processes' write-ahead objects
(``store/recovery.py``).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

from agentchat.core.backoff import Backoff
from agentchat.store.base import ObjectStore, PreconditionFailed

log = logging.getLogger(__name__)


def parse_segment_frames(data: bytes) -> list[bytes]:
    return [line for line in data.split(b"\n") if line]


def frame_seq(frame: bytes) -> int:
    # Frames start with b'{"type":"message","seq":<n>,' (frames.message_frame) or, in history, with
    # b'{"type":"gap","seq":<n>,' (frames.gap_frame).
    start = 24 if frame[9] == 0x6D else 20  # b"m"essage or b"g"ap
    return int(frame[start:frame.index(b",", start)])


def encode_wal(sections: dict[str, list[bytes]]) -> bytes:
    """A write-ahead object: for each channel a line ``#<channel>`` then its frames, one per line.
    Frames are JSON objects (they start with ``{``), so a ``#`` line cannot be mistaken for one."""
    lines: list[bytes] = []
    for channel, frames in sections.items():
        lines.append(b"#" + channel.encode())
        lines.extend(frames)
    return b"\n".join(lines)


def decode_wal(data: bytes) -> dict[str, list[bytes]]:
    sections: dict[str, list[bytes]] = {}
    current: list[bytes] | None = None
    for line in data.split(b"\n"):
        if not line:
            continue
        if line[:1] == b"#":
            current = sections.setdefault(line[1:].decode(), [])
        elif current is not None:
            current.append(line)
    return sections


async def put_until_stored(store: ObjectStore, key: str, data: bytes, on_failure: Callable[[], None]) -> None:
    """Create ``key`` with ``data``, retrying with backoff and jitter until it is stored. Keys and
    contents are fixed before the first attempt, so an attempt that was stored before its answer was
    lost shows up as ``PreconditionFailed`` on the retry: the same bytes are there."""
    # At most about a second between tries: the backlog goes out soon after storage is back.
    backoff = Backoff(0.05, 1.0)
    while True:
        try:
            await store.put(key, data, if_none_match=True)
            return
        except PreconditionFailed:
            return
        except Exception as exc:
            on_failure()
            log.warning("storing %s failed: %r; retrying", key, exc)
            await asyncio.sleep(backoff.next_delay())
