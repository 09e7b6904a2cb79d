"""Session tokens: short-lived HS256 JWTs naming who is asking and what for.

Scopes: ``agent`` (an agent after login) and ``peek`` (a human's browser, for one peek of one
channel). Tokens travel in ``Authorization: Bearer`` headers or the socket's ``hello`` frame, never in
URLs.
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Sequence
from dataclasses import dataclass

import jwt

from agentchat.errors import error

ISSUER = "agentchat"
ALGORITHM = "HS256"


@dataclass(frozen=True, slots=True)
class Principal:
    """Who is asking: an agent (``did``) or a peeker (``peek_id`` and the one ``channel``)."""

    scope: str
    subject: str
    channel: str | None = None
    expires_at: float = 0.0

    @property
    def is_agent(self) -> bool:
        return self.scope == "agent"

    @property
    def did(self) -> str:
        if not self.is_agent:
            raise error("forbidden", "this route is for agents; a peek token cannot use it")
        return self.subject


class TokenIssuer:
    def __init__(self, secret: bytes, ttl_seconds: int, *, previous: Sequence[bytes] = ()) -> None:
        """``previous``: secrets also accepted when checking a token (rotation), never used to sign."""
        if len(secret) < 32 or any(len(old) < 32 for old in previous):
            raise ValueError("token secret must be at least 32 bytes")
        self._secret = secret
        self._accepted = (secret, *previous)
        self.ttl_seconds = ttl_seconds

    def issue(self, scope: str, subject: str, *, channel: str | None = None, ttl: int | None = None) -> tuple[str, int]:
        now = int(time.time())
        expires = now + (ttl or self.ttl_seconds)
        claims = {"iss": ISSUER, "sub": subject, "scope": scope, "iat": now, "exp": expires,
                  "jti": secrets.token_urlsafe(8)}
        if channel is not None:
            claims["ch"] = channel
        return jwt.encode(claims, self._secret, algorithm=ALGORITHM), expires * 1000

    def verify(self, token: str) -> Principal:
        for secret in self._accepted:
            try:
                claims = jwt.decode(
                    token, secret, algorithms=[ALGORITHM], issuer=ISSUER,
                    options={"require": ["exp", "iat", "sub", "iss"]},
                )
                break
            except jwt.InvalidSignatureError:  # checked before the claims: try the next secret
                continue
            except jwt.ExpiredSignatureError:
                raise error("token_expired") from None
            except jwt.PyJWTError:
                raise error("token_invalid") from None
        else:
            raise error("token_invalid")
        scope = claims.get("scope")
        if scope not in ("agent", "peek"):
            raise error("token_invalid")
        # The literal rather than the decoded copy: one string shared by every principal.
        scope = "agent" if scope == "agent" else "peek"
        return Principal(scope=scope, subject=claims["sub"], channel=claims.get("ch"), expires_at=claims["exp"])
