"""The directory store: every object is a file under one root directory (the default, ``file://DIR``).

Layout: the key ``messages/ch1/000042`` is the file ``ROOT/messages/ch1/000042,obj``. The ``,obj``
suffix lets a key and a longer key that starts with it plus ``/`` live side by side, as in S3
(``channels/c1`` and ``channels/c1/keys/3``): the first is a file ``c1,obj``, the second sits in a
directory ``c1``. Keys cannot contain ``,``, so the store's own files (``,tmp.*`` while a write is in
flight, the ``,lock`` file in the root) never collide with an object and never show up in ``list``.

Durability: a write goes to a temporary file in the target directory, is fsynced, then renamed over the
object (``if_none_match``: hard-linked, which fails if the object exists) and the directory is fsynced,
so a returned ``put`` survives a crash and a reader sees the whole old or the whole new object.

Conditional writes: every write and delete of a key holds that key's lock slot: an ``asyncio.Lock`` in
the process and a byte-range lock on ``ROOT/,lock`` (open-file-description locks, so two stores on one
root, in one process or in several, exclude each other). The etag is the SHA-256 of the content, like
S3's MD5 etag a property of the bytes.

A crash in the middle of a write can leave a ``,tmp.*`` file behind; it is never listed or read.

Files are made 0600 and directories 0700 (the root too, tightened at start if it was wider): messages
are ciphertext, but member lists, ledgers and peek records are not.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import fcntl
import hashlib
import os
import secrets
import struct
import zlib
from collections.abc import Sequence
from pathlib import Path

from agentchat.errors import error
from agentchat.store.base import DELETE_BATCH, PreconditionFailed, StoredObject

KEY_CHARS = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789._:@=+-/")
MAX_KEY_LENGTH = 1024  # S3's limit
MAX_SEGMENT_LENGTH = 250  # a file name (255 bytes on common file systems) minus the suffix

_OBJECT_SUFFIX = ",obj"
_TEMP_PREFIX = ",tmp."
_LOCK_FILE = ",lock"
_LOCK_SLOTS = 1024

# Reading (and hashing) a file this small from the page cache costs less than the hop to a worker
# thread (bench/README.md, "Measurements behind constants"). Bigger files, and every write (fsync),
# go to a thread.
_INLINE_READ_BYTES = 64 * 1024


def check_key(key: str) -> list[str]:
    """Return the segments of ``key``, or raise ``ValueError`` if it is not a valid object key.

    Valid: 1 to 1024 characters from ``A-Z a-z 0-9 . _ : @ = + - /``; segments separated by single
    ``/``, none empty, none ``.`` or ``..``, none longer than 250 characters. Every store applies the
    same rule, so a key that works on one backend works on all.
    """
    if not key or len(key) > MAX_KEY_LENGTH or not KEY_CHARS.issuperset(key):
        raise ValueError(f"invalid store key {key!r}: use 1-{MAX_KEY_LENGTH} of A-Za-z0-9._:@=+-/")
    parts = key.split("/")
    for part in parts:
        if part in ("", ".", "..") or len(part) > MAX_SEGMENT_LENGTH:
            raise ValueError(f"invalid store key {key!r}: empty, '.', '..' or over-long segment")
    return parts


def check_prefix(prefix: str) -> tuple[list[str], str]:
    """Split a ``list`` prefix into whole directory segments and a partial last segment.

    A prefix may end in the middle of a segment (``messages/ch1/0000``) or with ``/``; otherwise it
    follows the key rules. Returns ``(["messages", "ch1"], "0000")``.
    """
    if not prefix:
        return [], ""
    if len(prefix) > MAX_KEY_LENGTH or not KEY_CHARS.issuperset(prefix):
        raise ValueError(f"invalid store prefix {prefix!r}")
    *dirs, partial = prefix.split("/")
    for part in dirs:
        if part in ("", ".", "..") or len(part) > MAX_SEGMENT_LENGTH:
            raise ValueError(f"invalid store prefix {prefix!r}: empty, '.', '..' or over-long segment")
    return dirs, partial


def content_etag(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _fsync_dir(path: str | Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class _SlotLock:
    """Cross-process exclusion on one byte of the lock file, held by the calling thread's store."""

    # struct flock on Linux: l_type, l_whence, l_start, l_len, l_pid (0 for OFD locks), padding.
    _FLOCK = "hhqqi4x"
    _OFD = getattr(fcntl, "F_OFD_SETLKW", None)

    def __init__(self, fd: int, slot: int) -> None:
        self._fd = fd
        self._slot = slot

    def __enter__(self) -> None:
        self._apply(fcntl.F_WRLCK)

    def __exit__(self, *exc: object) -> None:
        self._apply(fcntl.F_UNLCK)

    def _apply(self, kind: int) -> None:
        if self._OFD is not None:
            fcntl.fcntl(self._fd, self._OFD, struct.pack(self._FLOCK, kind, os.SEEK_SET, self._slot, 1, 0))
        else:  # no open-file-description locks (not Linux): one lock for the whole store
            fcntl.flock(self._fd, fcntl.LOCK_UN if kind == fcntl.F_UNLCK else fcntl.LOCK_EX)


class LocalStore:
    """An ``ObjectStore`` in a directory of the local file system."""

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root)
        self._lock_fd = -1
        self._slot_locks: list[asyncio.Lock] = []

    @classmethod
    def from_url(cls, url: str) -> LocalStore:
        """``file://./data`` (relative to the working directory) or ``file:///var/lib/agentchat``."""
        path = url.removeprefix("file://")
        if path == url or not path or "?" in path or "#" in path:
            raise ValueError(f"store {url!r}: use file://DIR, for example file://./data")
        return cls(path)

    async def start(self) -> None:
        try:
            self.root.mkdir(parents=True, exist_ok=True, mode=0o700)
            if self.root.stat().st_mode & 0o077:  # made by an earlier version, or by hand
                os.chmod(self.root, 0o700)
            self._lock_fd = os.open(self.root / _LOCK_FILE, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        except OSError as exc:
            raise error("store_unavailable", f"cannot open the store directory {self.root}: {exc}") from exc
        self._slot_locks = [asyncio.Lock() for _ in range(_LOCK_SLOTS)]

    async def close(self) -> None:
        if self._lock_fd >= 0:
            os.close(self._lock_fd)
            self._lock_fd = -1

    def _object_path(self, parts: list[str]) -> str:
        return os.path.join(self.root, *parts[:-1], parts[-1] + _OBJECT_SUFFIX)

    # -- reads ---------------------------------------------------------------------------------

    async def get(self, key: str) -> StoredObject | None:
        path = self._object_path(check_key(key))
        try:
            if os.stat(path).st_size <= _INLINE_READ_BYTES:
                return _read(path)
            return await asyncio.to_thread(_read, path)
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise error("store_unavailable", f"cannot read {key}: {exc.strerror}") from exc

    async def list(self, prefix: str, *, start_after: str = "", limit: int = 1000) -> list[str]:
        if limit < 1:
            raise ValueError(f"limit must be at least 1, got {limit}")
        dirs, partial = check_prefix(prefix)
        try:
            return await asyncio.to_thread(self._list_sync, dirs, partial, start_after, limit)
        except OSError as exc:
            raise error("store_unavailable", f"cannot list {prefix}: {exc.strerror}") from exc

    def _list_sync(self, dirs: list[str], partial: str, start_after: str, limit: int) -> list[str]:
        found: list[str] = []

        # Within one directory, an object ``name`` sorts as its key and a subdirectory as ``name/``
        # followed by its contents; walking entries in that order yields keys in byte order.
        def walk(directory: str, key_prefix: str, name_prefix: str) -> None:
            try:
                with os.scandir(directory) as scan:
                    entries = []
                    for entry in scan:
                        name = entry.name
                        if name.endswith(_OBJECT_SUFFIX):
                            segment = name[: -len(_OBJECT_SUFFIX)]
                            if "," not in segment and segment.startswith(name_prefix):
                                entries.append((key_prefix + segment, ""))
                        elif "," not in name and name.startswith(name_prefix):
                            if entry.is_dir(follow_symlinks=False):
                                entries.append((key_prefix + name + "/", name))
            except (FileNotFoundError, NotADirectoryError):
                return
            entries.sort()
            for sort_key, subdir in entries:
                if len(found) >= limit:
                    return
                if not subdir:
                    if sort_key > start_after:
                        found.append(sort_key)
                elif sort_key > start_after or start_after.startswith(sort_key):
                    walk(os.path.join(directory, subdir), sort_key, "")

        top = os.path.join(self.root, *dirs)
        walk(top, "".join(d + "/" for d in dirs), partial)
        return found

    # -- writes --------------------------------------------------------------------------------

    def _slot(self, key: str) -> int:
        if self._lock_fd < 0:
            raise RuntimeError("call start() before writing to the store")
        return zlib.crc32(key.encode()) % _LOCK_SLOTS

    async def put(
        self, key: str, data: bytes, *, if_none_match: bool = False, if_match: str | None = None
    ) -> str:
        parts = check_key(key)
        if if_none_match and if_match is not None:
            raise ValueError("put: give if_none_match or if_match, not both")
        data = bytes(data)
        slot = self._slot(key)
        async with self._slot_locks[slot]:
            try:
                return await asyncio.to_thread(self._put_sync, parts, data, slot, if_none_match, if_match)
            except PreconditionFailed:
                raise
            except OSError as exc:
                raise error("store_unavailable", f"cannot write {key}: {exc.strerror}") from exc

    def _put_sync(
        self, parts: list[str], data: bytes, slot: int, if_none_match: bool, if_match: str | None
    ) -> str:
        path = self._object_path(parts)
        directory = os.path.dirname(path)
        etag = content_etag(data)
        with _SlotLock(self._lock_fd, slot):
            if if_match is not None:
                try:
                    current = _read(path)
                except FileNotFoundError:
                    raise PreconditionFailed(f"{'/'.join(parts)} does not exist") from None
                if current.etag != if_match:
                    raise PreconditionFailed(f"{'/'.join(parts)} has changed")
            elif if_none_match and os.path.exists(path):
                raise PreconditionFailed(f"{'/'.join(parts)} exists")
            temp = self._write_temp(directory, parts[:-1], data)
            try:
                if if_none_match:
                    # link() refuses an existing target: atomic even against a writer that ignores
                    # the lock (another program, an older version).
                    try:
                        os.link(temp, path)
                    except FileExistsError:
                        raise PreconditionFailed(f"{'/'.join(parts)} exists") from None
                else:
                    os.replace(temp, path)
                    temp = ""
            finally:
                if temp:
                    os.unlink(temp)
            _fsync_dir(directory)
        return etag

    def _write_temp(self, directory: str, dir_parts: list[str], data: bytes) -> str:
        # A concurrent delete may remove an empty directory between creating it and writing into
        # it; creating it again is enough.
        for _ in range(5):
            temp = os.path.join(directory, _TEMP_PREFIX + secrets.token_hex(8))
            try:
                self._make_dirs(dir_parts)
                fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
            except FileNotFoundError:
                continue
            try:
                with os.fdopen(fd, "wb", closefd=False) as out:
                    out.write(data)
                os.fsync(fd)
            except BaseException:
                os.close(fd)
                os.unlink(temp)
                raise
            os.close(fd)
            return temp
        raise OSError(errno.ENOENT, "directory keeps disappearing", directory)

    def _make_dirs(self, dir_parts: list[str]) -> None:
        parent = str(self.root)
        for part in dir_parts:
            path = os.path.join(parent, part)
            try:
                os.mkdir(path, 0o700)
            except FileExistsError:
                pass
            else:
                _fsync_dir(parent)  # the new directory's name is durable before anything inside it
            parent = path

    async def delete(self, key: str) -> None:
        parts = check_key(key)
        slot = self._slot(key)
        async with self._slot_locks[slot]:
            try:
                await asyncio.to_thread(self._delete_many_sync, [parts])
            except OSError as exc:
                raise error("store_unavailable", f"cannot delete {key}: {exc.strerror}") from exc

    async def delete_many(self, keys: Sequence[str]) -> None:
        # One trip to a worker thread for the whole batch, and each directory fsynced once rather
        # than once per key: the compactor deletes a few write-ahead objects a second, and every
        # fsync is kernel work competing with the event loop for the process's core.
        keys = list(keys)
        for key in keys:
            check_key(key)
        for start in range(0, len(keys), DELETE_BATCH):
            batch = keys[start:start + DELETE_BATCH]
            slots = sorted({self._slot(key) for key in batch})
            async with contextlib.AsyncExitStack() as held:
                for slot in slots:  # always in slot order: two batches never wait on each other
                    await held.enter_async_context(self._slot_locks[slot])
                try:
                    await asyncio.to_thread(self._delete_many_sync, [check_key(key) for key in batch])
                except OSError as exc:
                    raise error("store_unavailable", f"cannot delete {len(batch)} objects: {exc.strerror}") from exc

    def _delete_many_sync(self, batch: list[list[str]]) -> None:
        deleted: list[list[str]] = []
        for parts in batch:
            with _SlotLock(self._lock_fd, self._slot("/".join(parts))):
                try:
                    os.unlink(self._object_path(parts))
                except FileNotFoundError:
                    continue
            deleted.append(parts)
        for directory in sorted({os.path.dirname(self._object_path(parts)) for parts in deleted}):
            _fsync_dir(directory)
        # Drop directories left empty, deepest first; stop at the first one that is not.
        for parts in deleted:
            for depth in range(len(parts) - 1, 0, -1):
                try:
                    os.rmdir(os.path.join(self.root, *parts[:depth]))
                except OSError:
                    break


def _read(path: str) -> StoredObject:
    with open(path, "rb") as f:
        data = f.read()
    return StoredObject(data, content_etag(data))
