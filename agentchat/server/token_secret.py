"""Where the token-signing secret comes from (README, "Token secret").

1. ``AGENTCHAT_TOKEN_SECRET`` (text, or ``base64:...`` for raw bytes). Required when several processes
   share a Redis bus: they must all sign with the same secret.
2. Else a secret an earlier version kept in the object store (``server/token-secret``): still used, so
   an upgrade logs nobody out, with a warning at every start saying how to move it to the setting.
3. Else, one process on the directory store: a secret made once and kept in the file ``,token-secret``
   of the store's directory, mode 0600 (the store never lists ``,`` names, nor copies them in a backup).

The secret is never written to the object store any more: whoever can read a bucket or its backups
could otherwise sign tokens for any agent. ``AGENTCHAT_TOKEN_SECRET_PREVIOUS`` is accepted when
checking tokens, never for signing: set the old secret there while rotating, until the tokens it
signed have expired (``token_ttl_seconds``).
"""

from __future__ import annotations

import base64
import binascii
import logging
import os
import secrets
from pathlib import Path

from agentchat.config import ConfigError, Settings
from agentchat.store import keys as store_keys
from agentchat.store.base import ObjectStore
from agentchat.store.local import LocalStore

log = logging.getLogger(__name__)

SECRET_FILE = ",token-secret"
MIN_SECRET_BYTES = 32


def parse_secret(value: str, name: str) -> bytes:
    """The bytes of a secret setting: ``base64:...`` decoded, anything else as UTF-8 text."""
    if value.startswith("base64:"):
        try:
            raw = base64.b64decode(value.removeprefix("base64:"), validate=True)
        except (binascii.Error, ValueError):
            raise ConfigError(f"{name}: not valid base64 after 'base64:'") from None
    else:
        raw = value.encode()
    if len(raw) < MIN_SECRET_BYTES:
        raise ConfigError(f"{name} must be at least {MIN_SECRET_BYTES} bytes (for example: openssl rand -hex 32)")
    return raw


async def load_token_secrets(settings: Settings, store: ObjectStore) -> tuple[bytes, list[bytes]]:
    """(the secret that signs, the secrets also accepted when checking). Raises ``ConfigError`` with
    the reason when no secret can be had."""
    previous = [parse_secret(settings.token_secret_previous, "AGENTCHAT_TOKEN_SECRET_PREVIOUS")] \
        if settings.token_secret_previous else []
    if settings.token_secret:
        return parse_secret(settings.token_secret, "AGENTCHAT_TOKEN_SECRET"), previous
    legacy = await store.get(store_keys.server_secret())
    if legacy is not None:
        log.warning(
            "the token secret is read from the store object %s, where an earlier version kept it: anyone who "
            "can read the store or its backups can sign tokens. Move it to the setting: "
            "AGENTCHAT_TOKEN_SECRET=base64:<that object's bytes in base64> on every process (a directory "
            "store keeps the object in the file server/token-secret,obj: base64 -w0 < that file), restart, "
            "then delete the object", store_keys.server_secret())
        return legacy.data, previous
    if not settings.bus.startswith("memory:"):
        raise ConfigError("AGENTCHAT_TOKEN_SECRET is required with a Redis bus: every process must sign tokens "
                          "with the same secret (for example: AGENTCHAT_TOKEN_SECRET=$(openssl rand -hex 32))")
    if not settings.store.startswith("file:"):
        raise ConfigError("AGENTCHAT_TOKEN_SECRET is required with an S3 store (a secret made here would have "
                          "nowhere safe to be kept): for example AGENTCHAT_TOKEN_SECRET=$(openssl rand -hex 32)")
    return _secret_file(LocalStore.from_url(settings.store).root / SECRET_FILE), previous


def _secret_file(path: Path) -> bytes:
    """The secret kept in ``path`` (mode 0600), made on the first start."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    except FileExistsError:
        if path.stat().st_mode & 0o077:
            os.chmod(path, 0o600)
        data = path.read_bytes()
        if len(data) < MIN_SECRET_BYTES:
            raise ConfigError(f"{path} holds no usable token secret: delete it (a new one is made; everyone "
                              "logs in again) or set AGENTCHAT_TOKEN_SECRET") from None
        return data
    secret = secrets.token_bytes(MIN_SECRET_BYTES)
    try:
        os.write(fd, secret)
        os.fsync(fd)
    finally:
        os.close(fd)
    log.info("made a token secret, kept in %s", path)
    return secret
