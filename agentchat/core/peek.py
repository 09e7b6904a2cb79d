"""The peek state machine, sans I/O: plain values in, a new state and a list of effects out.

A human pays to *peek* at a channel; the channel's agents get a refusal window; if nobody refuses, the
payment is captured and the peeker may read the channel for a while::

    awaiting_payment --payment_authorized--> countdown --deadline_reached--> awaiting_key
        awaiting_key --key_granted--> capturing --capture_succeeded--> active --time_up--> ended
    awaiting_payment --payment_failed--> payment_failed      countdown --refuse--> refused
    awaiting_payment --cancel--> canceled                    countdown --cancel--> withdrawn
    awaiting_payment --deadline_reached--> expired           awaiting_key --deadline_reached--> no_key
                                                             capturing --capture_failed--> payment_failed

``protocol/peek.md`` is the same table for other implementers; ``TRANSITIONS`` below is its source and a
test keeps the two in step.

Calling contract (for the I/O layer)
------------------------------------
1. ``open_peek(...)`` makes version 1 and its first effects; store it with a create-if-absent write.
2. For every event: load the stored bytes, ``Peek.from_bytes``, ``step(peek, event, now)``, then write
   ``new.to_bytes()`` with a compare-and-set against the bytes just loaded. Every transition increments
   ``version``, so two different states never serialise to the same bytes and a stale writer always
   loses. The loser reloads and calls ``step`` again; it usually gets ``peek_state`` (the race was
   decided, e.g. a refusal that lost to the deadline), which is the answer to give its caller.
3. Only after the write won, execute the effects in list order. Every effect names the peek, so each
   can be made idempotent (payment idempotency keys and ledger entry ids derive from the peek id), and
   executing one twice after a crash is harmless.
4. Time events (``DeadlineReached``, ``TimeUp``) are due at ``peek.wake_at``. ``ArmTimer`` says so after
   a transition; after a restart, ``recovery_effects(peek)`` re-arms timers and re-issues a capture that
   may have been cut short, for every peek that is not terminal. That is what keeps a deadline enforced
   when the process that started it dies.

Decisions
---------
- A refusal is valid iff ``now < deadline``; ``deadline_reached`` is valid iff ``now >= deadline``. At
  any instant exactly one of the two is accepted, so the deadline wins a tie at the boundary.
- No charge without a key. The countdown's outcome (nobody refused) is ``awaiting_key``: the agents
  are asked to wrap the channel key for the peeker, and only a kept grant (``key_granted``) moves the
  peek to ``capturing``. If no grant comes by ``key_deadline`` (deadline + ``grant_wait_seconds``) the
  peek ends ``no_key`` and the hold is released. The grant is kept by the server and handed to the
  peeker only once the capture succeeded (``DeliverGrants``), so a failed capture is never a free read.
- ``capturing`` is a short state between the grant and the capture's result, so exactly one process
  issues the capture.
- Shares are fixed when the countdown starts: ``payment_authorized`` carries the channel's members then
  and the peek keeps them (``members``); the capture is split among them, whoever joined or left since.
  Peeks stored before this field existed have ``members`` None and split among the members at capture.
- ``expired`` means the payment was never authorised before ``payment_expires_at`` (the payment is
  canceled so it cannot be authorised afterwards). A capture that fails at the deadline ends in
  ``payment_failed``, like an authorisation that fails: in both the peeker pays nothing and sees nothing.
- Only the peeker may cancel: while the payment is awaited (``canceled``) or during the countdown
  (``withdrawn``: the hold is released and the agents are told). A withdrawal racing a refusal or the
  deadline is one more event on the same compare-and-set, so exactly one of them wins. Once the
  countdown is over the outcome is the agents' (a key) or the grant wait's.
- Who may refuse (a member of the channel) and who may cancel (the holder of the peek's token) is checked
  by the caller; this module knows no memberships.
- Times are float seconds from an injected clock; money is integer cents.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, fields, replace
from enum import StrEnum
from typing import ClassVar, NamedTuple, TypeAlias

import orjson

from agentchat import errors

# Defaults; the server passes its settings in (see ``Settings.peek_*``).
REFUSAL_WINDOW_SECONDS = 60.0
PEEK_DURATION_SECONDS = 600.0
# How long after the countdown the agents have to hand over the channel key before the hold is released.
GRANT_WAIT_SECONDS = 30.0
# How long the human has to authorise the payment before the peek expires.
PAYMENT_TIMEOUT_SECONDS = 900.0
PEEK_PRICE_CENTS = 500
REFUSAL_FEE_CENTS = 100


class PeekState(StrEnum):
    AWAITING_PAYMENT = "awaiting_payment"
    COUNTDOWN = "countdown"
    AWAITING_KEY = "awaiting_key"
    CAPTURING = "capturing"
    ACTIVE = "active"
    ENDED = "ended"
    REFUSED = "refused"
    PAYMENT_FAILED = "payment_failed"
    CANCELED = "canceled"
    WITHDRAWN = "withdrawn"
    EXPIRED = "expired"
    NO_KEY = "no_key"

    @property
    def terminal(self) -> bool:
        return self in _TERMINAL


_TERMINAL = frozenset(
    {PeekState.ENDED, PeekState.REFUSED, PeekState.PAYMENT_FAILED, PeekState.CANCELED, PeekState.EXPIRED,
     PeekState.WITHDRAWN, PeekState.NO_KEY}
)


# --- the peek ---------------------------------------------------------------------------------------

_MONEY_FIELDS = ("price_cents", "refusal_fee_cents")
_SPAN_FIELDS = ("refusal_window_seconds", "duration_seconds", "grant_wait_seconds")
_TIME_FIELDS = ("created_at", "updated_at", "payment_expires_at")
_OPTIONAL_TIME_FIELDS = ("deadline", "activated_at", "ends_at", "key_deadline")
# Fields added after peeks were first stored: a stored peek without them loads with their defaults.
_ADDED_FIELDS = frozenset({"grant_wait_seconds", "key_deadline", "members"})
_TEXT_FIELDS = ("id", "channel", "peeker_public_key")
_OPTIONAL_TEXT_FIELDS = ("refused_by", "payment_ref", "failure_reason")


@dataclass(frozen=True, slots=True)
class Peek:
    """One peek, as stored. Immutable: transitions return a new one with ``version`` + 1.

    ``deadline`` is set from the countdown on (authorised at + refusal window), and ``members`` (the
    channel's members then, sorted: who shares the capture); ``key_deadline`` once the countdown is
    over (deadline + grant wait); ``activated_at`` and ``ends_at`` from activation on. ``updated_at`` is the time of the last transition, so for a terminal
    peek it is when it ended. Times are normalised to float so that serialisation is exact.
    """

    id: str
    channel: str
    peeker_public_key: str  # the browser's X25519 public key, base64; the grant is wrapped for it
    price_cents: int
    refusal_fee_cents: int
    refusal_window_seconds: float
    duration_seconds: float
    state: PeekState
    version: int
    created_at: float
    updated_at: float
    payment_expires_at: float
    deadline: float | None = None
    activated_at: float | None = None
    ends_at: float | None = None
    refused_by: str | None = None  # DID of the refusing agent
    payment_ref: str | None = None  # the payment provider's id, from the authorisation
    failure_reason: str | None = None
    grant_wait_seconds: float = GRANT_WAIT_SECONDS
    key_deadline: float | None = None
    members: tuple[str, ...] | None = None  # None: stored before shares were fixed at the countdown

    def __post_init__(self) -> None:
        # Stored peeks come back through here (``from_bytes``), so this is also the input check.
        for name in _TEXT_FIELDS:
            _require_text(name, getattr(self, name))
        for name in _OPTIONAL_TEXT_FIELDS:
            value = getattr(self, name)
            if value is not None:
                _require_text(name, value)
        for name in _MONEY_FIELDS:
            _require_int(name, getattr(self, name), minimum=0)
        _require_int("version", self.version, minimum=1)
        for name in _SPAN_FIELDS:
            object.__setattr__(self, name, _require_time(name, getattr(self, name)))
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive")
        for name in _TIME_FIELDS:
            object.__setattr__(self, name, _require_time(name, getattr(self, name)))
        for name in _OPTIONAL_TIME_FIELDS:
            value = getattr(self, name)
            if value is not None:
                object.__setattr__(self, name, _require_time(name, value))
        object.__setattr__(self, "state", PeekState(self.state))
        if self.members is not None:
            if not isinstance(self.members, (list, tuple)):
                raise TypeError(f"members must be a list of DIDs, got {type(self.members).__name__}")
            for did in self.members:
                _require_text("members", did)
            object.__setattr__(self, "members", tuple(sorted(set(self.members))))

    @property
    def wake_at(self) -> float | None:
        """When the next time event is due (``DeadlineReached`` or ``TimeUp``); None if none is."""
        if self.state is PeekState.AWAITING_PAYMENT:
            return self.payment_expires_at
        if self.state is PeekState.COUNTDOWN:
            return self.deadline
        if self.state is PeekState.AWAITING_KEY:
            return self.key_deadline
        if self.state is PeekState.ACTIVE:
            return self.ends_at
        return None

    def to_bytes(self) -> bytes:
        """Canonical JSON: the same peek always gives the same bytes (compare-and-set relies on it)."""
        return orjson.dumps({f.name: getattr(self, f.name) for f in fields(self)})

    @classmethod
    def from_bytes(cls, data: bytes) -> Peek:
        """Inverse of ``to_bytes``; raises ``ValueError`` on anything ``to_bytes`` could not have made."""
        try:
            raw = orjson.loads(data)
        except orjson.JSONDecodeError as exc:
            raise ValueError(f"stored peek is not JSON: {exc}") from None
        if not isinstance(raw, dict):
            raise ValueError("stored peek is not a JSON object")
        expected = {f.name for f in fields(cls)}
        if raw.keys() != expected and not (expected - _ADDED_FIELDS <= raw.keys() <= expected):
            missing, extra = sorted(expected - raw.keys()), sorted(raw.keys() - expected)
            raise ValueError(f"stored peek has missing fields {missing} and unknown fields {extra}")
        try:
            return cls(**raw)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"stored peek is invalid: {exc}") from None


def _require_text(name: str, value: object) -> None:
    if not isinstance(value, str) or not value:
        raise TypeError(f"{name} must be a non-empty string, got {value!r}")


def _require_int(name: str, value: object, *, minimum: int) -> None:
    if type(value) is not int:  # bool and float are not money
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < minimum:
        raise ValueError(f"{name} must be at least {minimum}, got {value}")


def _require_time(name: str, value: object) -> float:
    if type(value) not in (int, float):  # excludes bool
        raise TypeError(f"{name} must be a number of seconds, got {type(value).__name__}")
    seconds = float(value)  # type: ignore[arg-type]
    if not math.isfinite(seconds):
        raise ValueError(f"{name} must be finite, got {seconds}")
    return seconds


# --- events -----------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class PaymentAuthorized:
    """The payment provider holds the peek price (Stripe: the PaymentIntent became capturable)."""

    name: ClassVar[str] = "payment_authorized"
    payment_ref: str
    members: tuple[str, ...] = ()  # the channel's members now: they share the capture

    def __post_init__(self) -> None:
        _require_text("payment_ref", self.payment_ref)
        for did in self.members:
            _require_text("members", did)


@dataclass(frozen=True, slots=True)
class PaymentFailed:
    """The authorisation was declined or abandoned."""

    name: ClassVar[str] = "payment_failed"
    reason: str = "payment declined"


@dataclass(frozen=True, slots=True)
class Cancel:
    """The peeker withdraws: before the countdown (``canceled``) or during it (``withdrawn``)."""

    name: ClassVar[str] = "cancel"


@dataclass(frozen=True, slots=True)
class Refuse:
    """An agent of the channel refuses the peek (the caller has checked membership)."""

    name: ClassVar[str] = "refuse"
    agent_did: str

    def __post_init__(self) -> None:
        _require_text("agent_did", self.agent_did)


@dataclass(frozen=True, slots=True)
class DeadlineReached:
    """Timer event at ``wake_at`` while awaiting payment (expiry), counting down (refusal deadline) or
    awaiting the key (grant wait over)."""

    name: ClassVar[str] = "deadline_reached"


@dataclass(frozen=True, slots=True)
class KeyGranted:
    """A member's client handed over the channel key for the peeker; the server keeps it until the
    capture succeeded."""

    name: ClassVar[str] = "key_granted"
    agent_did: str

    def __post_init__(self) -> None:
        _require_text("agent_did", self.agent_did)


@dataclass(frozen=True, slots=True)
class CaptureSucceeded:
    name: ClassVar[str] = "capture_succeeded"


@dataclass(frozen=True, slots=True)
class CaptureFailed:
    """The capture was definitively rejected (transient errors are retried by the payments layer)."""

    name: ClassVar[str] = "capture_failed"
    reason: str = "capture failed"


@dataclass(frozen=True, slots=True)
class TimeUp:
    """Timer event at ``ends_at`` while active."""

    name: ClassVar[str] = "time_up"


Event: TypeAlias = (
    PaymentAuthorized
    | PaymentFailed
    | Cancel
    | Refuse
    | DeadlineReached
    | KeyGranted
    | CaptureSucceeded
    | CaptureFailed
    | TimeUp
)
EVENT_TYPES: tuple[type[Event], ...] = (
    PaymentAuthorized,
    PaymentFailed,
    Cancel,
    Refuse,
    DeadlineReached,
    KeyGranted,
    CaptureSucceeded,
    CaptureFailed,
    TimeUp,
)


# --- effects: what the I/O layer must do once the new state is stored --------------------------------


@dataclass(frozen=True, slots=True)
class AuthorizePayment:
    """Start holding ``amount_cents`` from the peeker (Stripe: PaymentIntent, manual capture)."""

    peek_id: str
    amount_cents: int


@dataclass(frozen=True, slots=True)
class CancelPayment:
    """Release the hold, if any: the peeker is not charged. ``payment_ref`` is None if never authorised."""

    peek_id: str
    payment_ref: str | None


@dataclass(frozen=True, slots=True)
class CapturePayment:
    """Capture the held amount, then report ``CaptureSucceeded`` or ``CaptureFailed``."""

    peek_id: str
    payment_ref: str | None
    amount_cents: int


@dataclass(frozen=True, slots=True)
class ChargeRefusalFee:
    """Debit the refusing agent's balance (``ledger.refusal_fee_entries``)."""

    peek_id: str
    agent_did: str
    amount_cents: int


@dataclass(frozen=True, slots=True)
class SplitCapture:
    """Record the captured amount, split among ``members`` (those of the countdown's start; None for a
    peek stored before they were kept: the channel's members at capture) (``ledger.split_capture``)."""

    peek_id: str
    channel: str
    amount_cents: int
    members: tuple[str, ...] | None = None


@dataclass(frozen=True, slots=True)
class RequestGrant:
    """Ask a member's client to wrap the channel's current epoch key for ``peeker_public_key``."""

    peek_id: str
    channel: str
    peeker_public_key: str


@dataclass(frozen=True, slots=True)
class DeliverGrants:
    """The capture succeeded: hand the peeker the grants kept for it (never before)."""

    peek_id: str


@dataclass(frozen=True, slots=True)
class RevokeAccess:
    """The peek is over: revoke the peeker's read access; members start a new epoch."""

    peek_id: str
    channel: str


@dataclass(frozen=True, slots=True)
class NotifyAgents:
    """Tell the channel's agents the peek is now ``state`` (countdown: the request, with its deadline)."""

    peek_id: str
    channel: str
    state: PeekState


@dataclass(frozen=True, slots=True)
class NotifyPeeker:
    """Tell the peeker the peek is now ``state`` (countdown ticks are sent separately)."""

    peek_id: str
    state: PeekState


@dataclass(frozen=True, slots=True)
class ArmTimer:
    """Deliver the peek's next time event at ``at`` (replacing any earlier timer for it)."""

    peek_id: str
    at: float


Effect: TypeAlias = (
    AuthorizePayment
    | CancelPayment
    | CapturePayment
    | ChargeRefusalFee
    | SplitCapture
    | RequestGrant
    | DeliverGrants
    | RevokeAccess
    | NotifyAgents
    | NotifyPeeker
    | ArmTimer
)


class Transition(NamedTuple):
    peek: Peek
    effects: tuple[Effect, ...]


# --- transitions ------------------------------------------------------------------------------------


def open_peek(
    peek_id: str,
    channel: str,
    peeker_public_key: str,
    now: float,
    *,
    price_cents: int = PEEK_PRICE_CENTS,
    refusal_fee_cents: int = REFUSAL_FEE_CENTS,
    refusal_window_seconds: float = REFUSAL_WINDOW_SECONDS,
    duration_seconds: float = PEEK_DURATION_SECONDS,
    payment_timeout_seconds: float = PAYMENT_TIMEOUT_SECONDS,
    grant_wait_seconds: float = GRANT_WAIT_SECONDS,
) -> Transition:
    """A new peek (version 1, awaiting payment) and the effects that start it.

    The window and duration are stored in the peek, so every process drives it with the same values
    even if their settings differ.
    """
    timeout = _require_time("payment_timeout_seconds", payment_timeout_seconds)
    if timeout <= 0:
        raise ValueError("payment_timeout_seconds must be positive")
    created_at = _require_time("now", now)
    peek = Peek(
        id=peek_id,
        channel=channel,
        peeker_public_key=peeker_public_key,
        price_cents=price_cents,
        refusal_fee_cents=refusal_fee_cents,
        refusal_window_seconds=refusal_window_seconds,
        duration_seconds=duration_seconds,
        grant_wait_seconds=grant_wait_seconds,
        state=PeekState.AWAITING_PAYMENT,
        version=1,
        created_at=created_at,
        updated_at=created_at,
        payment_expires_at=created_at + timeout,
    )
    return Transition(
        peek, (AuthorizePayment(peek.id, peek.price_cents), ArmTimer(peek.id, peek.payment_expires_at))
    )


def step(peek: Peek, event: Event, now: float) -> Transition:
    """Apply ``event`` at time ``now``; the new peek (``version`` + 1) and the effects to execute.

    Raises ``Conflict('peek_state')`` with a sentence for the user if the peek's state does not accept
    the event (including a refusal at or after the deadline and a time event before it is due); the
    peek is then unchanged.
    """
    now = _require_time("now", now)
    rule = _RULES.get((peek.state, type(event)))
    if rule is None:
        raise errors.error("peek_state", _rejection(peek, event))
    moved, effects = rule.handler(peek, event, now, rule.to)
    new = replace(moved, state=rule.to, version=peek.version + 1, updated_at=now)
    return Transition(new, tuple(effects))


def recovery_effects(peek: Peek) -> tuple[Effect, ...]:
    """What to (re)start for a peek loaded after a restart: its timer, or a capture cut short.

    Terminal peeks need nothing. Re-issuing a capture is safe because captures are idempotent per peek.
    """
    if peek.state is PeekState.CAPTURING:
        return (CapturePayment(peek.id, peek.payment_ref, peek.price_cents),)
    at = peek.wake_at
    return () if at is None else (ArmTimer(peek.id, at),)


def countdown_seconds_left(peek: Peek, now: float) -> int:
    """Whole seconds left to refuse, rounded up (60 at authorisation, 0 at the deadline); 0 if the
    peek is not counting down. For the peeker's countdown ticks."""
    if peek.state is not PeekState.COUNTDOWN or peek.deadline is None:
        return 0
    # Rounded to the microsecond first, so float noise (59.000000000001) does not show as a second.
    return max(0, math.ceil(round(peek.deadline - now, 6)))


# A handler gets the peek, the event, the time and the state the rule moves to; it returns the peek with
# the fields that change besides the state (``step`` sets state, version and time) and the effects.
_Handler = Callable[[Peek, Event, float, PeekState], tuple[Peek, list[Effect]]]

_WINDOW_CLOSED = "The peek can no longer be refused: its refusal window has closed."


def _authorized(peek: Peek, event: Event, now: float, to: PeekState) -> tuple[Peek, list[Effect]]:
    assert isinstance(event, PaymentAuthorized)
    deadline = now + peek.refusal_window_seconds
    members = tuple(sorted(set(event.members)))
    return replace(peek, payment_ref=event.payment_ref, deadline=deadline, members=members), [
        NotifyAgents(peek.id, peek.channel, to),
        NotifyPeeker(peek.id, to),
        ArmTimer(peek.id, deadline),
    ]


def _payment_failed(peek: Peek, event: Event, now: float, to: PeekState) -> tuple[Peek, list[Effect]]:
    assert isinstance(event, PaymentFailed)
    return replace(peek, failure_reason=event.reason), [NotifyPeeker(peek.id, to)]


def _canceled(peek: Peek, event: Event, now: float, to: PeekState) -> tuple[Peek, list[Effect]]:
    return peek, [CancelPayment(peek.id, peek.payment_ref), NotifyPeeker(peek.id, to)]


def _withdrawn(peek: Peek, event: Event, now: float, to: PeekState) -> tuple[Peek, list[Effect]]:
    assert peek.deadline is not None
    if now >= peek.deadline:  # the deadline won: the countdown is over
        raise errors.error("peek_state", "The peek can no longer be withdrawn: its countdown is over.")
    return peek, [CancelPayment(peek.id, peek.payment_ref), NotifyAgents(peek.id, peek.channel, to),
                  NotifyPeeker(peek.id, to)]


def _expired(peek: Peek, event: Event, now: float, to: PeekState) -> tuple[Peek, list[Effect]]:
    if now < peek.payment_expires_at:
        raise errors.error("peek_state", "The peek's payment can still be authorised; it has not expired.")
    return peek, [CancelPayment(peek.id, peek.payment_ref), NotifyPeeker(peek.id, to)]


def _refused(peek: Peek, event: Event, now: float, to: PeekState) -> tuple[Peek, list[Effect]]:
    assert isinstance(event, Refuse) and peek.deadline is not None
    if now >= peek.deadline:
        raise errors.error("peek_state", _WINDOW_CLOSED)
    return replace(peek, refused_by=event.agent_did), [
        CancelPayment(peek.id, peek.payment_ref),
        ChargeRefusalFee(peek.id, event.agent_did, peek.refusal_fee_cents),
        NotifyAgents(peek.id, peek.channel, to),
        NotifyPeeker(peek.id, to),
    ]


def _deadline_passed(peek: Peek, event: Event, now: float, to: PeekState) -> tuple[Peek, list[Effect]]:
    assert peek.deadline is not None
    if now < peek.deadline:
        raise errors.error("peek_state", "The peek's refusal window is still open.")
    # The outcome of the countdown is decided here: everyone hears it now. Nothing is taken yet: the
    # capture waits for a key the peeker can use.
    key_deadline = now + peek.grant_wait_seconds
    return replace(peek, key_deadline=key_deadline), [
        RequestGrant(peek.id, peek.channel, peek.peeker_public_key),
        NotifyAgents(peek.id, peek.channel, to),
        NotifyPeeker(peek.id, to),
        ArmTimer(peek.id, key_deadline),
    ]


def _key_granted(peek: Peek, event: Event, now: float, to: PeekState) -> tuple[Peek, list[Effect]]:
    return peek, [
        NotifyAgents(peek.id, peek.channel, to),
        NotifyPeeker(peek.id, to),
        CapturePayment(peek.id, peek.payment_ref, peek.price_cents),
    ]


def _no_key(peek: Peek, event: Event, now: float, to: PeekState) -> tuple[Peek, list[Effect]]:
    assert peek.key_deadline is not None
    if now < peek.key_deadline:
        raise errors.error("peek_state", "The agents still have time to hand over the channel key.")
    return replace(peek, failure_reason="no agent handed over the channel key in time"), [
        CancelPayment(peek.id, peek.payment_ref),
        NotifyAgents(peek.id, peek.channel, to),
        NotifyPeeker(peek.id, to),
    ]


def _captured(peek: Peek, event: Event, now: float, to: PeekState) -> tuple[Peek, list[Effect]]:
    ends_at = now + peek.duration_seconds
    return replace(peek, activated_at=now, ends_at=ends_at), [
        SplitCapture(peek.id, peek.channel, peek.price_cents, peek.members),
        DeliverGrants(peek.id),
        NotifyAgents(peek.id, peek.channel, to),
        NotifyPeeker(peek.id, to),
        ArmTimer(peek.id, ends_at),
    ]


def _capture_failed(peek: Peek, event: Event, now: float, to: PeekState) -> tuple[Peek, list[Effect]]:
    assert isinstance(event, CaptureFailed)
    return replace(peek, failure_reason=event.reason), [
        CancelPayment(peek.id, peek.payment_ref),  # release whatever hold is left
        NotifyAgents(peek.id, peek.channel, to),
        NotifyPeeker(peek.id, to),
    ]


def _ended(peek: Peek, event: Event, now: float, to: PeekState) -> tuple[Peek, list[Effect]]:
    assert peek.ends_at is not None
    if now < peek.ends_at:
        raise errors.error("peek_state", "The peek is still active.")
    return peek, [
        RevokeAccess(peek.id, peek.channel),
        NotifyAgents(peek.id, peek.channel, to),
        NotifyPeeker(peek.id, to),
    ]


class _Rule(NamedTuple):
    to: PeekState
    handler: _Handler


_S = PeekState
_RULES: dict[tuple[PeekState, type[Event]], _Rule] = {
    (_S.AWAITING_PAYMENT, PaymentAuthorized): _Rule(_S.COUNTDOWN, _authorized),
    (_S.AWAITING_PAYMENT, PaymentFailed): _Rule(_S.PAYMENT_FAILED, _payment_failed),
    (_S.AWAITING_PAYMENT, Cancel): _Rule(_S.CANCELED, _canceled),
    (_S.AWAITING_PAYMENT, DeadlineReached): _Rule(_S.EXPIRED, _expired),
    (_S.COUNTDOWN, Refuse): _Rule(_S.REFUSED, _refused),
    (_S.COUNTDOWN, Cancel): _Rule(_S.WITHDRAWN, _withdrawn),
    (_S.COUNTDOWN, DeadlineReached): _Rule(_S.AWAITING_KEY, _deadline_passed),
    (_S.AWAITING_KEY, KeyGranted): _Rule(_S.CAPTURING, _key_granted),
    (_S.AWAITING_KEY, DeadlineReached): _Rule(_S.NO_KEY, _no_key),
    (_S.CAPTURING, CaptureSucceeded): _Rule(_S.ACTIVE, _captured),
    (_S.CAPTURING, CaptureFailed): _Rule(_S.PAYMENT_FAILED, _capture_failed),
    (_S.ACTIVE, TimeUp): _Rule(_S.ENDED, _ended),
}

# (state, event name) -> next state: the whole machine, as documented in protocol/peek.md.
TRANSITIONS: Mapping[tuple[PeekState, str], PeekState] = {
    (state, event.name): rule.to for (state, event), rule in _RULES.items()
}


def _rejection(peek: Peek, event: Event) -> str:
    """The sentence a user reads when ``event`` does not apply to ``peek``."""
    state = peek.state
    if isinstance(event, Refuse):
        if state is PeekState.AWAITING_PAYMENT:
            return "The peek cannot be refused yet: its payment is not authorised."
        if state in (PeekState.AWAITING_KEY, PeekState.CAPTURING):
            return _WINDOW_CLOSED
        return f"The peek can no longer be refused: it is {state}."
    if isinstance(event, Cancel):
        if state in (PeekState.AWAITING_KEY, PeekState.CAPTURING):
            return "The peek can no longer be withdrawn: its countdown is over and nobody refused."
        return f"The peek can no longer be canceled: it is {state}."
    if isinstance(event, KeyGranted):
        if state is PeekState.ACTIVE:
            return "The peek already has its key."
        return f"Keys are handed over once the countdown is over; the peek is {state}."
    if state.terminal:
        return f"The peek is {state}; it accepts no {event.name}."
    return f"A peek in state {state} does not accept {event.name}."
