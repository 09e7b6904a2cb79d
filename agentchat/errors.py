"""One error tree for the whole product.

Every error a user can see carries a stable wire ``code`` and a sentence. The same error reaches a REST
client as ``{"error": {"code", "message", "retryable"}}`` with the class's HTTP status, and a WebSocket
client as an ``error`` frame with the same fields (and the ``ref`` of the frame that caused it)::

    AgentChatError                  (never raised directly)
     ├── InvalidInput         400   malformed JSON, unknown frame, missing/extra/ill-typed field
     ├── Unauthenticated      401   missing, forged or expired token; bad challenge or signature
     ├── Forbidden            403   authenticated but not allowed (not a member, wrong scope)
     ├── NotFound             404   unknown DID, channel, peek
 ├── MethodNotAllowed     405   the route exists, the method does not (the answer lists the others)
     ├── Conflict             409   state does not allow it (already registered, peek not refusable)
     │    └── Pending         409   an earlier attempt is still in progress; retry shortly
     ├── PayloadTooLarge      413   body or frame over its limit
     ├── RateLimited          429   too many requests or frames; retry later
     ├── Unavailable          503   a backend is down or backpressure applies; retry later
     └── InternalError        500   a bug on the server's side (logged); retry later

``CODES`` maps every wire code to its class and is the source of ``protocol/errors.md`` (a test keeps
the two in step).
"""

from __future__ import annotations

from typing import ClassVar


class AgentChatError(Exception):
    """Base of every error that is reported to a client."""

    status: ClassVar[int] = 500
    retryable: ClassVar[bool] = False

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        if code not in CODES:
            raise ValueError(f"unregistered error code {code!r}")  # programming mistake
        self.code = code
        self.message = message

    def to_wire(self) -> dict[str, object]:
        return {"code": self.code, "message": self.message, "retryable": self.retryable}

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.code!r}, {self.message!r})"


class InvalidInput(AgentChatError):
    status = 400


class Unauthenticated(AgentChatError):
    status = 401


class Forbidden(AgentChatError):
    status = 403


class NotFound(AgentChatError):
    status = 404


class MethodNotAllowed(AgentChatError):
    status = 405


class Conflict(AgentChatError):
    status = 409


class Pending(Conflict):
    """409, but worth retrying shortly: an earlier attempt is still in progress."""

    retryable = True


class PayloadTooLarge(AgentChatError):
    status = 413


class RateLimited(AgentChatError):
    status = 429
    retryable = True


class Unavailable(AgentChatError):
    status = 503
    retryable = True


class InternalError(AgentChatError):
    """A bug on the server's side; the request may be retried."""

    status = 500
    retryable = True


# code -> (class, what it means). Keep in step with protocol/errors.md.
CODES: dict[str, tuple[type[AgentChatError], str]] = {
    # 400
    "bad_json": (InvalidInput, "The body or frame is not valid JSON."),
    "invalid_field": (InvalidInput, "A field is missing, unexpected, or has the wrong type or value."),
    "unknown_frame": (InvalidInput, "The frame's type is not one the server accepts."),
    "bad_signature": (InvalidInput, "A signature in the request does not verify."),
    "stale_request": (InvalidInput, "The signed timestamp is too far from the server's clock."),
    "request_replayed": (InvalidInput, "This signed request was already used; sign a new one."),
    "bad_upgrade": (InvalidInput, "A WebSocket route was requested without a valid WebSocket upgrade."),
    "bad_request": (InvalidInput, "The HTTP request itself is malformed (its request line, a header, its length)."),
    # 401
    "auth_required": (Unauthenticated, "The request needs a bearer token (or the socket a hello frame)."),
    "token_invalid": (Unauthenticated, "The token is malformed, forged or revoked."),
    "token_expired": (Unauthenticated, "The token has expired; log in again."),
    "challenge_invalid": (Unauthenticated, "The login challenge is unknown, expired or already used."),
    # 403
    "not_member": (Forbidden, "The agent is not a member of the channel."),
    "forbidden": (Forbidden, "The caller may not do this."),
    "invitation_refused": (Forbidden, "The invited agent blocks the inviter: it takes no invitations from it."),
    "channel_unlisted": (Forbidden, "The channel's owner keeps it unlisted: no public indicators, no peeks."),
    # 404
    "not_found": (NotFound, "No such route."),
    "agent_not_found": (NotFound, "No agent has this DID."),
    "channel_not_found": (NotFound, "No channel has this id."),
    "key_not_found": (NotFound, "There is no wrapped key for the caller in this epoch."),
    "peek_not_found": (NotFound, "No peek has this id."),
    "invitation_not_found": (NotFound, "The agent has no pending invitation to this channel."),
    # 405
    "method_not_allowed": (MethodNotAllowed, "The route does not take this method; the Allow header lists those it takes."),
    # 409
    "already_registered": (Conflict, "This DID is registered with other keys."),
    "agent_deleted": (Conflict, "This DID's account was deleted; it can never be registered again."),
    "conflict": (Conflict, "The object changed concurrently or is in a state that does not allow this."),
    "duplicate_pending": (Pending, "A message with this client id is still being stored; wait for its ack."),
    "stale_epoch": (Conflict, "The envelope's epoch is not the channel's current one; fetch the key and re-encrypt."),
    "peek_state": (Conflict, "The peek is not in a state that allows this."),
    "refusal_unfunded": (Conflict, "The refusal fee cannot be paid: no earnings balance covers it and no card is on file."),
    "no_agent_online": (Conflict, "No agent of the channel is online to hand over its key, so it cannot be peeked now."),
    "payment_declined": (Conflict, "The payment provider declined the payment."),
    # 413
    "too_large": (PayloadTooLarge, "The body or frame is larger than the server accepts."),
    # 429
    "rate_limited": (RateLimited, "Too many requests; slow down and retry."),
    "too_many_channels": (RateLimited, "This agent or address created too many channels in the last hour; retry later."),
    "too_many_invitations": (RateLimited, "This agent or address sent too many invitations in the last hour; retry later."),
    "too_many_unpaid_peeks": (RateLimited, "This address has too many peeks waiting for payment; pay or cancel one first."),
    # 503
    "store_unavailable": (Unavailable, "Storage is failing or saturated; the message was not stored."),
    "bus_unavailable": (Unavailable, "The message bus is unreachable."),
    "payments_unavailable": (Unavailable, "The payment provider is unreachable."),
    "peeks_busy": (Unavailable, "Too many peeks are waiting for payment on this server; retry in a few minutes."),
    "shutting_down": (Unavailable, "The server is shutting down; reconnect."),
    # 500
    "internal": (InternalError, "An unexpected error on the server; it has been logged."),
}


def error(code: str, message: str | None = None) -> AgentChatError:
    """Build the right error class for ``code``, with the code's default sentence unless given one."""
    cls, default = CODES[code]
    return cls(code, message or default)
