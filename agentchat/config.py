"""Settings: one dataclass, filled from defaults, then ``AGENTCHAT_*`` environment variables, then flags.

One setting per backend, chosen by URL scheme:

- ``bus``: ``memory://`` (default, one process) or ``redis://host:port/db``
- ``store``: ``file://./data`` (default) or ``s3://bucket?endpoint=...&region=...``
- ``payments``: ``dev://`` (default, no money moves) or ``stripe://`` (keys from their own settings)

Anything the parser does not understand is rejected with a sentence, never silently ignored.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from urllib.parse import parse_qsl, urlsplit, urlunsplit

ENV_PREFIX = "AGENTCHAT_"


class ConfigError(ValueError):
    """A setting has a value the server cannot use."""


@dataclass(frozen=True)
class Limits:
    """Every size and rate the server enforces; all can be set (``AGENTCHAT_MAX_FRAME_BYTES`` ...)."""

    max_body_bytes: int = 256 * 1024
    max_frame_bytes: int = 128 * 1024
    max_ciphertext_bytes: int = 64 * 1024
    max_name_chars: int = 64
    max_channel_members: int = 256
    # Largest page of a channel or invitation listing (REST) and of the channel ids in one welcome or
    # channels frame. Listings are complete: they page, never cut short.
    channels_page_max: int = 1000
    # Channels an agent, and all the agents behind one client address, may create per hour, and
    # invitations (each invited agent, at creation or later) they may send per hour.
    channel_creations_per_hour: int = 600
    channel_creations_per_hour_per_address: int = 3000
    invitations_per_hour: int = 5000
    invitations_per_hour_per_address: int = 25000
    history_page_max: int = 500
    # Frames an agent's socket may send per second (token bucket, burst of twice the rate).
    frames_per_second: int = 2000
    # Requests an address may make per second to the unauthenticated auth routes.
    auth_requests_per_second: int = 20
    # Messages waiting for one socket before it is closed as too slow (it resumes on reconnect).
    send_queue_max: int = 4096
    # Messages sequenced but not yet stored, per process, before sends get ``store_unavailable``.
    pending_writes_max: int = 50_000


@dataclass(frozen=True)
class Settings:
    host: str = "127.0.0.1"
    port: int = 8080
    bus: str = "memory://"
    store: str = "file://./data"
    payments: str = "dev://"
    # Signs session tokens. Empty: a random secret is made once and kept in the store.
    token_secret: str = ""
    token_ttl_seconds: int = 3600
    challenge_ttl_seconds: int = 60
    # Group commit (store/messages.py): a batch is written when it holds this many messages, or when
    # its oldest has waited long enough: up to batch_max_wait_ms under load (2,000 messages/s or more
    # per process), proportionally less at lighter load, so a lone message is written at once.
    batch_max_messages: int = 2000
    batch_max_wait_ms: int = 100
    # Peeks
    peek_price_cents: int = 500
    refusal_fee_cents: int = 100
    peek_refusal_window_seconds: float = 60.0
    # How long an active peek lasts: ten minutes of reading for $5 (protocol/peek.md, Timings).
    peek_duration_seconds: float = 600.0
    # How long the human has to authorise the payment before the peek expires.
    peek_payment_timeout_seconds: float = 900.0
    # After a countdown nobody refused, how long the agents have to hand over the channel key; with no
    # key by then the hold is released and the human pays nothing (protocol/peek.md).
    peek_grant_wait_seconds: float = 30.0
    # How far below zero a refusal may take an agent's balance when neither its earnings nor a card
    # cover the fee (a debt, paid first from later shares). Past it, refusing needs a card on file.
    refusal_debt_limit_cents: int = 300
    # Peeks waiting for payment (anonymous work): at most this many per client address, and in all.
    peek_unpaid_per_address: int = 5
    peek_unpaid_total: int = 1000
    # Every process re-reads the open peeks this often and drives those that are due, so a deadline
    # is enforced even when the process that armed its timer is gone.
    peek_scan_seconds: float = 2.0
    # Bearer token of the operator's revenue view (GET /api/v1/operator/revenue); empty: disabled.
    operator_token: str = ""
    stripe_secret_key: str = ""
    stripe_publishable_key: str = ""
    stripe_webhook_secret: str = ""
    stripe_api_base: str = ""
    log_level: str = "info"
    # How many reverse proxies (load balancers) stand in front and append to X-Forwarded-For; the
    # client address used for rate limits is the one that many hops from the end. 0: the peer address.
    trusted_proxies: int = 0
    # Retention (README, Operations): how long a channel's messages are kept when its owner set
    # nothing, and the most an owner may set; 0: forever, and no maximum. The compactor looks for
    # expired segments every retention_check_seconds.
    retention_default_seconds: int = 0
    retention_max_seconds: int = 0
    retention_check_seconds: float = 600.0
    # Bearer token for /metrics; empty: /metrics answers loopback clients only.
    metrics_token: str = ""
    limits: Limits = field(default_factory=Limits)

    def __post_init__(self) -> None:
        scheme_of = lambda url: urlsplit(url).scheme  # noqa: E731
        if scheme_of(self.bus) not in ("memory", "redis", "rediss"):
            raise ConfigError(f"bus {self.bus!r}: use memory:// or redis://host:port/db")
        if scheme_of(self.store) not in ("file", "s3"):
            raise ConfigError(f"store {self.store!r}: use file://DIR or s3://bucket?endpoint=...")
        if scheme_of(self.payments) not in ("dev", "stripe"):
            raise ConfigError(f"payments {self.payments!r}: use dev:// or stripe://")
        for name in ("peek_refusal_window_seconds", "peek_duration_seconds", "peek_payment_timeout_seconds",
                     "peek_scan_seconds", "peek_grant_wait_seconds"):
            if not getattr(self, name) > 0:
                raise ConfigError(f"{name} must be a positive number of seconds")
        if self.retention_default_seconds < 0 or self.retention_max_seconds < 0:
            raise ConfigError("retention_default_seconds and retention_max_seconds must be 0 (forever) or more")
        if not self.retention_check_seconds > 0:
            raise ConfigError("retention_check_seconds must be a positive number of seconds")
        if not 0 < self.port < 65536 and self.port != 0:
            raise ConfigError(f"port {self.port} is out of range")


_SECRET_PARAMS = {"secret_key", "access_key", "password", "token"}


def redact_url(url: str) -> str:
    """The URL with its password and secret query parameters masked, for logs and banners."""
    parts = urlsplit(url)
    if not parts.password and not parts.query:
        return url
    netloc = parts.netloc
    if parts.password:
        netloc = netloc.replace(":" + parts.password + "@", ":***@", 1)
    query = "&".join(f"{k}=***" if k in _SECRET_PARAMS else f"{k}={v}"
                     for k, v in parse_qsl(parts.query, keep_blank_values=True))
    return urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))


def _coerce(name: str, raw: str, kind: type) -> object:
    if kind is int:
        try:
            return int(raw)
        except ValueError:
            raise ConfigError(f"{name} must be a whole number, got {raw!r}") from None
    if kind is float:
        try:
            return float(raw)
        except ValueError:
            raise ConfigError(f"{name} must be a number, got {raw!r}") from None
    return raw


def _field_types(cls: type) -> dict[str, type]:
    hints = {"int": int, "str": str, "float": float}
    return {f.name: hints.get(str(f.type), str) for f in dataclasses.fields(cls) if f.name != "limits"}


def load_settings(env: Mapping[str, str] | None = None, **overrides: object) -> Settings:
    """Defaults, then ``AGENTCHAT_<NAME>`` from ``env`` (default ``os.environ``), then ``overrides``.

    Limits are read from the same namespace (``AGENTCHAT_MAX_FRAME_BYTES``). Unknown ``AGENTCHAT_``
    variables are an error, so a typo does not silently leave a default in place.
    """
    env = os.environ if env is None else env
    top_types = _field_types(Settings)
    limit_types = _field_types(Limits)
    top: dict[str, object] = {}
    limits: dict[str, object] = {}
    for key, raw in env.items():
        if not key.startswith(ENV_PREFIX):
            continue
        name = key[len(ENV_PREFIX):].lower()
        if name in top_types:
            top[name] = _coerce(key, raw, top_types[name])
        elif name in limit_types:
            limits[name] = _coerce(key, raw, limit_types[name])
        else:
            raise ConfigError(f"unknown setting {key}")
    for name, value in overrides.items():
        if value is None:
            continue
        if name in top_types:
            top[name] = value
        elif name in limit_types:
            limits[name] = value
        else:
            raise ConfigError(f"unknown setting {name}")
    return Settings(**top, limits=Limits(**limits))  # type: ignore[arg-type]
