"""The peek state machine, driven with plain values and an injected clock (no event loop, no I/O)."""

from __future__ import annotations

import contextlib
import re
from collections.abc import Callable
from pathlib import Path

import orjson
import pytest
from hypothesis import given
from hypothesis import strategies as st

from agentchat.core.peek import (
    EVENT_TYPES,
    TRANSITIONS,
    ArmTimer,
    AuthorizePayment,
    Cancel,
    CancelPayment,
    CaptureFailed,
    CapturePayment,
    CaptureSucceeded,
    ChargeRefusalFee,
    DeadlineReached,
    DeliverGrants,
    Event,
    KeyGranted,
    NotifyAgents,
    NotifyPeeker,
    PaymentAuthorized,
    PaymentFailed,
    Peek,
    PeekState,
    Refuse,
    RequestGrant,
    RevokeAccess,
    SplitCapture,
    TimeUp,
    countdown_seconds_left,
    open_peek,
    recovery_effects,
    step,
)
from agentchat.errors import Conflict

T0 = 1_700_000_000.0
AUTH_AT = T0 + 5.0
DEADLINE = AUTH_AT + 60.0
GRANTED_AT = DEADLINE + 1.0
KEY_DEADLINE = DEADLINE + 30.0
ACTIVE_AT = DEADLINE + 2.0
ENDS_AT = ACTIVE_AT + 600.0
KEY = "bW9jay14MjU1MTktcHVibGljLWtleS0zMi1ieXRlcyE="
AGENT = "did:agentchat:z6MkAgentOne"
S = PeekState


def opened() -> Peek:
    return open_peek("pk_1", "ch_1", KEY, T0).peek


def counting_down() -> Peek:
    return step(opened(), PaymentAuthorized("pi_1"), AUTH_AT).peek


def awaiting_key() -> Peek:
    return step(counting_down(), DeadlineReached(), DEADLINE).peek


def capturing() -> Peek:
    return step(awaiting_key(), KeyGranted(AGENT), GRANTED_AT).peek


def active() -> Peek:
    return step(capturing(), CaptureSucceeded(), ACTIVE_AT).peek


def reach(state: PeekState) -> Peek:
    """A peek in ``state``, reached through legal transitions only."""
    paths: dict[PeekState, Callable[[], Peek]] = {
        S.AWAITING_PAYMENT: opened,
        S.COUNTDOWN: counting_down,
        S.AWAITING_KEY: awaiting_key,
        S.CAPTURING: capturing,
        S.ACTIVE: active,
        S.ENDED: lambda: step(active(), TimeUp(), ENDS_AT).peek,
        S.REFUSED: lambda: step(counting_down(), Refuse(AGENT), AUTH_AT + 1).peek,
        S.PAYMENT_FAILED: lambda: step(opened(), PaymentFailed("card declined"), T0 + 1).peek,
        S.CANCELED: lambda: step(opened(), Cancel(), T0 + 1).peek,
        S.EXPIRED: lambda: step(opened(), DeadlineReached(), T0 + 900).peek,
        S.WITHDRAWN: lambda: step(counting_down(), Cancel(), AUTH_AT + 1).peek,
        S.NO_KEY: lambda: step(awaiting_key(), DeadlineReached(), KEY_DEADLINE).peek,
    }
    peek = paths[state]()
    assert peek.state is state
    return peek


SAMPLE_EVENTS: dict[type[Event], Event] = {
    PaymentAuthorized: PaymentAuthorized("pi_2"),
    PaymentFailed: PaymentFailed(),
    Cancel: Cancel(),
    Refuse: Refuse(AGENT),
    DeadlineReached: DeadlineReached(),
    KeyGranted: KeyGranted(AGENT),
    CaptureSucceeded: CaptureSucceeded(),
    CaptureFailed: CaptureFailed(),
    TimeUp: TimeUp(),
}


# --- opening ----------------------------------------------------------------------------------------


def test_open_awaits_payment_and_asks_for_an_authorisation() -> None:
    peek, effects = open_peek("pk_1", "ch_1", KEY, T0)
    assert peek.state is S.AWAITING_PAYMENT
    assert peek.version == 1
    assert (peek.price_cents, peek.refusal_fee_cents) == (500, 100)
    assert (peek.refusal_window_seconds, peek.duration_seconds) == (60.0, 600.0)
    assert peek.payment_expires_at == T0 + 900
    assert peek.deadline is None and peek.activated_at is None and peek.ends_at is None
    assert effects == (AuthorizePayment("pk_1", 500), ArmTimer("pk_1", T0 + 900))


def test_open_uses_the_settings_passed_in() -> None:
    peek = open_peek(
        "pk_1", "ch_1", KEY, T0, price_cents=700, refusal_fee_cents=0,
        refusal_window_seconds=30, duration_seconds=120, payment_timeout_seconds=10,
    ).peek
    peek = step(peek, PaymentAuthorized("pi_1"), T0 + 1).peek
    assert peek.deadline == T0 + 31
    peek = step(step(peek, DeadlineReached(), T0 + 31).peek, KeyGranted(AGENT), T0 + 31.5).peek
    peek = step(peek, CaptureSucceeded(), T0 + 32).peek
    assert peek.ends_at == T0 + 152
    assert peek.price_cents == 700


@pytest.mark.parametrize(
    "kwargs",
    [
        {"price_cents": 5.0},
        {"price_cents": True},
        {"refusal_fee_cents": -1},
        {"refusal_window_seconds": 0},
        {"duration_seconds": float("inf")},
        {"payment_timeout_seconds": 0},
    ],
)
def test_open_rejects_bad_settings(kwargs: dict[str, object]) -> None:
    with pytest.raises((TypeError, ValueError)):
        open_peek("pk_1", "ch_1", KEY, T0, **kwargs)  # type: ignore[arg-type]


def test_open_rejects_an_empty_peeker_key() -> None:
    with pytest.raises(TypeError):
        open_peek("pk_1", "ch_1", "", T0)


# --- every legal transition -------------------------------------------------------------------------


def test_authorisation_starts_the_countdown() -> None:
    peek, effects = step(opened(), PaymentAuthorized("pi_1"), AUTH_AT)
    assert peek.state is S.COUNTDOWN
    assert peek.deadline == DEADLINE
    assert peek.payment_ref == "pi_1"
    assert effects == (
        NotifyAgents("pk_1", "ch_1", S.COUNTDOWN),
        NotifyPeeker("pk_1", S.COUNTDOWN),
        ArmTimer("pk_1", DEADLINE),
    )


def test_failed_authorisation_ends_the_peek() -> None:
    peek, effects = step(opened(), PaymentFailed("card declined"), T0 + 3)
    assert peek.state is S.PAYMENT_FAILED
    assert peek.failure_reason == "card declined"
    assert effects == (NotifyPeeker("pk_1", S.PAYMENT_FAILED),)


def test_peeker_cancels_before_the_countdown() -> None:
    peek, effects = step(opened(), Cancel(), T0 + 3)
    assert peek.state is S.CANCELED
    assert effects == (CancelPayment("pk_1", None), NotifyPeeker("pk_1", S.CANCELED))


def test_payment_never_authorised_expires() -> None:
    peek, effects = step(opened(), DeadlineReached(), T0 + 900)
    assert peek.state is S.EXPIRED
    assert effects == (CancelPayment("pk_1", None), NotifyPeeker("pk_1", S.EXPIRED))


def test_refusal_cancels_the_payment_and_charges_the_agent() -> None:
    peek, effects = step(counting_down(), Refuse(AGENT), AUTH_AT + 10)
    assert peek.state is S.REFUSED
    assert peek.refused_by == AGENT
    assert effects == (
        CancelPayment("pk_1", "pi_1"),
        ChargeRefusalFee("pk_1", AGENT, 100),
        NotifyAgents("pk_1", "ch_1", S.REFUSED),
        NotifyPeeker("pk_1", S.REFUSED),
    )


def test_deadline_without_refusal_asks_for_the_key_and_takes_nothing_yet() -> None:
    peek, effects = step(counting_down(), DeadlineReached(), DEADLINE)
    assert peek.state is S.AWAITING_KEY
    assert peek.key_deadline == KEY_DEADLINE
    assert effects == (
        RequestGrant("pk_1", "ch_1", KEY),
        NotifyAgents("pk_1", "ch_1", S.AWAITING_KEY),
        NotifyPeeker("pk_1", S.AWAITING_KEY),
        ArmTimer("pk_1", KEY_DEADLINE),
    )
    assert not any(isinstance(e, CapturePayment) for e in effects)


def test_a_kept_grant_captures() -> None:
    peek, effects = step(awaiting_key(), KeyGranted(AGENT), GRANTED_AT)
    assert peek.state is S.CAPTURING
    assert effects == (
        NotifyAgents("pk_1", "ch_1", S.CAPTURING),
        NotifyPeeker("pk_1", S.CAPTURING),
        CapturePayment("pk_1", "pi_1", 500),
    )


def test_no_key_in_time_releases_the_hold() -> None:
    with pytest.raises(Conflict):
        step(awaiting_key(), DeadlineReached(), KEY_DEADLINE - 0.001)
    peek, effects = step(awaiting_key(), DeadlineReached(), KEY_DEADLINE)
    assert peek.state is S.NO_KEY and peek.state.terminal
    assert "key" in (peek.failure_reason or "")
    assert effects == (
        CancelPayment("pk_1", "pi_1"),
        NotifyAgents("pk_1", "ch_1", S.NO_KEY),
        NotifyPeeker("pk_1", S.NO_KEY),
    )


def test_peeker_withdraws_during_the_countdown() -> None:
    peek, effects = step(counting_down(), Cancel(), AUTH_AT + 10)
    assert peek.state is S.WITHDRAWN and peek.state.terminal
    assert effects == (
        CancelPayment("pk_1", "pi_1"),
        NotifyAgents("pk_1", "ch_1", S.WITHDRAWN),
        NotifyPeeker("pk_1", S.WITHDRAWN),
    )


def test_withdrawal_at_the_deadline_loses_to_it() -> None:
    with pytest.raises(Conflict) as caught:
        step(counting_down(), Cancel(), DEADLINE)
    assert "countdown is over" in caught.value.message


@given(offset=st.floats(min_value=-5.0, max_value=5.0))
def test_withdrawal_refusal_and_deadline_give_one_outcome(offset: float) -> None:
    """Whichever of the three is applied first to the stored peek, the others then fail by state."""
    now = DEADLINE + offset
    start = counting_down()
    for first in (Cancel(), Refuse(AGENT), DeadlineReached()):
        try:
            won = step(start, first, now).peek
        except Conflict:
            continue
        for other in (Cancel(), Refuse(AGENT)):
            if type(other) is not type(first):
                with pytest.raises(Conflict):
                    step(won, other, now)


def test_members_are_fixed_when_the_countdown_starts() -> None:
    peek = step(opened(), PaymentAuthorized("pi_1", ("did:b", "did:a", "did:b")), AUTH_AT).peek
    assert peek.members == ("did:a", "did:b")
    later = step(step(step(peek, DeadlineReached(), DEADLINE).peek, KeyGranted(AGENT), GRANTED_AT).peek,
                 CaptureSucceeded(), ACTIVE_AT)
    assert later.effects[0] == SplitCapture("pk_1", "ch_1", 500, ("did:a", "did:b"))


def test_a_peek_stored_before_the_new_fields_still_loads() -> None:
    """Bytes in the layout peeks were stored in before grant waits and fixed members."""
    raw = orjson.loads(counting_down().to_bytes())
    for added in ("grant_wait_seconds", "key_deadline", "members"):
        del raw[added]
    old = Peek.from_bytes(orjson.dumps(raw))
    assert old.members is None and old.grant_wait_seconds == 30.0
    assert step(old, DeadlineReached(), DEADLINE).peek.state is S.AWAITING_KEY
    raw["state"], raw["version"] = "capturing", 3  # a capture today's code left in flight
    captured = step(Peek.from_bytes(orjson.dumps(raw)), CaptureSucceeded(), ACTIVE_AT)
    assert captured.peek.state is S.ACTIVE
    assert captured.effects[0] == SplitCapture("pk_1", "ch_1", 500, None)


def test_capture_activates_the_peek() -> None:
    peek, effects = step(capturing(), CaptureSucceeded(), ACTIVE_AT)
    assert peek.state is S.ACTIVE
    assert (peek.activated_at, peek.ends_at) == (ACTIVE_AT, ENDS_AT)
    assert effects == (
        SplitCapture("pk_1", "ch_1", 500, ()),
        DeliverGrants("pk_1"),
        NotifyAgents("pk_1", "ch_1", S.ACTIVE),
        NotifyPeeker("pk_1", S.ACTIVE),
        ArmTimer("pk_1", ENDS_AT),
    )


def test_failed_capture_ends_in_payment_failed() -> None:
    peek, effects = step(capturing(), CaptureFailed("authorisation lapsed"), ACTIVE_AT)
    assert peek.state is S.PAYMENT_FAILED
    assert peek.failure_reason == "authorisation lapsed"
    assert effects == (
        CancelPayment("pk_1", "pi_1"),
        NotifyAgents("pk_1", "ch_1", S.PAYMENT_FAILED),
        NotifyPeeker("pk_1", S.PAYMENT_FAILED),
    )


def test_time_up_ends_the_peek_and_revokes_access() -> None:
    peek, effects = step(active(), TimeUp(), ENDS_AT)
    assert peek.state is S.ENDED
    assert peek.updated_at == ENDS_AT
    assert effects == (
        RevokeAccess("pk_1", "ch_1"),
        NotifyAgents("pk_1", "ch_1", S.ENDED),
        NotifyPeeker("pk_1", S.ENDED),
    )


def test_every_transition_increments_the_version_and_keeps_the_rest() -> None:
    peek = opened()
    path: list[tuple[Event, float]] = [
        (PaymentAuthorized("pi_1"), AUTH_AT),
        (DeadlineReached(), DEADLINE),
        (KeyGranted(AGENT), GRANTED_AT),
        (CaptureSucceeded(), ACTIVE_AT),
        (TimeUp(), ENDS_AT),
    ]
    for expected_version, (event, now) in enumerate(path, start=2):
        new = step(peek, event, now).peek
        assert new.version == expected_version
        assert new.updated_at == now
        assert (new.id, new.channel, new.created_at, new.price_cents) == (
            peek.id, peek.channel, peek.created_at, peek.price_cents,
        )
        peek = new


# --- every illegal transition -----------------------------------------------------------------------


ILLEGAL = [
    (state, event_type)
    for state in PeekState
    for event_type in EVENT_TYPES
    if (state, event_type.name) not in TRANSITIONS
]


@pytest.mark.parametrize(("state", "event_type"), ILLEGAL, ids=lambda v: getattr(v, "name", str(v)))
def test_illegal_transition_is_a_peek_state_conflict(state: PeekState, event_type: type[Event]) -> None:
    peek = reach(state)
    before = peek.to_bytes()
    # Long after every deadline, so only the state can be what rejects the event.
    with pytest.raises(Conflict) as caught:
        step(peek, SAMPLE_EVENTS[event_type], T0 + 1_000_000)
    assert caught.value.code == "peek_state"
    assert caught.value.message.endswith(".")
    assert peek.to_bytes() == before


def test_nothing_leaves_a_terminal_state() -> None:
    terminal = {s for s in PeekState if s.terminal}
    assert terminal == {S.ENDED, S.REFUSED, S.PAYMENT_FAILED, S.CANCELED, S.EXPIRED, S.WITHDRAWN, S.NO_KEY}
    assert not any(state in terminal for state, _ in TRANSITIONS)


def test_user_facing_sentences() -> None:
    def message(peek: Peek, event: Event, now: float) -> str:
        with pytest.raises(Conflict) as caught:
            step(peek, event, now)
        return caught.value.message

    assert "not authorised" in message(opened(), Refuse(AGENT), T0)
    assert "refusal window has closed" in message(capturing(), Refuse(AGENT), DEADLINE)
    assert "it is refused" in message(reach(S.REFUSED), Refuse(AGENT), AUTH_AT + 2)
    assert "countdown is over" in message(capturing(), Cancel(), DEADLINE)


def test_events_reject_empty_identifiers() -> None:
    with pytest.raises(TypeError):
        Refuse("")
    with pytest.raises(TypeError):
        PaymentAuthorized("")


# --- time boundaries --------------------------------------------------------------------------------


def test_refusal_just_before_the_deadline_wins() -> None:
    assert step(counting_down(), Refuse(AGENT), DEADLINE - 1e-6).peek.state is S.REFUSED


def test_refusal_exactly_at_the_deadline_is_rejected() -> None:
    with pytest.raises(Conflict, match="refusal window has closed"):
        step(counting_down(), Refuse(AGENT), DEADLINE)


def test_deadline_event_before_the_deadline_is_rejected() -> None:
    with pytest.raises(Conflict, match="still open"):
        step(counting_down(), DeadlineReached(), DEADLINE - 1e-6)


@given(offset=st.floats(min_value=-70.0, max_value=70.0, allow_nan=False))
def test_refusal_and_deadline_are_never_both_accepted(offset: float) -> None:
    peek = counting_down()
    now = DEADLINE + offset
    outcomes = []
    events: tuple[Event, ...] = (Refuse(AGENT), DeadlineReached())
    for event in events:
        with contextlib.suppress(Conflict):
            outcomes.append(step(peek, event, now).peek.state)
    assert outcomes == ([S.REFUSED] if now < DEADLINE else [S.AWAITING_KEY])


def test_payment_expiry_boundary() -> None:
    with pytest.raises(Conflict, match="not expired"):
        step(opened(), DeadlineReached(), T0 + 900 - 1e-6)
    assert step(opened(), DeadlineReached(), T0 + 900).peek.state is S.EXPIRED
    # Until it expires, a late authorisation still starts the countdown.
    assert step(opened(), PaymentAuthorized("pi_1"), T0 + 899).peek.state is S.COUNTDOWN


def test_time_up_boundary() -> None:
    with pytest.raises(Conflict, match="still active"):
        step(active(), TimeUp(), ENDS_AT - 1e-6)
    assert step(active(), TimeUp(), ENDS_AT).peek.state is S.ENDED


def test_wake_at_names_the_next_due_time_event() -> None:
    assert opened().wake_at == T0 + 900
    assert counting_down().wake_at == DEADLINE
    assert capturing().wake_at is None
    assert active().wake_at == ENDS_AT
    assert all(reach(s).wake_at is None for s in PeekState if s.terminal)


def test_recovery_rearms_timers_and_reissues_a_capture() -> None:
    assert recovery_effects(opened()) == (ArmTimer("pk_1", T0 + 900),)
    assert recovery_effects(counting_down()) == (ArmTimer("pk_1", DEADLINE),)
    assert recovery_effects(capturing()) == (CapturePayment("pk_1", "pi_1", 500),)
    assert recovery_effects(active()) == (ArmTimer("pk_1", ENDS_AT),)
    assert all(recovery_effects(reach(s)) == () for s in PeekState if s.terminal)


# --- countdown ticks --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("elapsed", "left"),
    [(0.0, 60), (0.5, 60), (1.0, 59), (59.0, 1), (59.999, 1), (60.0, 0), (75.0, 0)],
)
def test_countdown_seconds_left(elapsed: float, left: int) -> None:
    assert countdown_seconds_left(counting_down(), AUTH_AT + elapsed) == left


def test_countdown_ignores_float_noise() -> None:
    peek = step(open_peek("pk_1", "ch_1", KEY, 0.0).peek, PaymentAuthorized("pi_1"), 0.1).peek
    assert peek.deadline == pytest.approx(60.1)
    assert countdown_seconds_left(peek, 1.1) == 59


def test_countdown_is_zero_outside_the_countdown() -> None:
    assert countdown_seconds_left(opened(), T0) == 0
    assert countdown_seconds_left(capturing(), DEADLINE) == 0
    assert countdown_seconds_left(reach(S.REFUSED), AUTH_AT + 1) == 0


# --- serialisation ----------------------------------------------------------------------------------


@pytest.mark.parametrize("state", list(PeekState))
def test_round_trip_in_every_state(state: PeekState) -> None:
    peek = reach(state)
    data = peek.to_bytes()
    again = Peek.from_bytes(data)
    assert again == peek
    assert again.to_bytes() == data


times = st.floats(min_value=0.0, max_value=1e12, allow_nan=False, allow_infinity=False)
spans = st.floats(min_value=1e-3, max_value=1e6, allow_nan=False, allow_infinity=False)


@given(
    created=times,
    window=spans | st.integers(1, 3600),
    duration=spans | st.integers(1, 86_400),
    gaps=st.lists(st.floats(min_value=0.0, max_value=1e6), min_size=3, max_size=3),
    price=st.integers(0, 10**9),
    text=st.text(min_size=1, max_size=40),
)
def test_round_trip_is_exact_for_any_values(
    created: float, window: float, duration: float, gaps: list[float], price: int, text: str
) -> None:
    peek, _ = open_peek(
        text, text, text, created, price_cents=price,
        refusal_window_seconds=window, duration_seconds=duration,
    )
    now = created
    states = [peek]
    path: tuple[Event, ...] = (PaymentAuthorized(text), DeadlineReached(), KeyGranted(text), CaptureSucceeded())
    for event, gap in zip(path, [*gaps, 0.0], strict=True):
        now = max(now + gap, peek.wake_at or now)
        peek = step(peek, event, now).peek
        states.append(peek)
    for peek in states:
        data = peek.to_bytes()
        assert Peek.from_bytes(data) == peek
        assert Peek.from_bytes(data).to_bytes() == data


def test_every_transition_changes_the_bytes() -> None:
    peek = opened()
    seen = {peek.to_bytes()}
    path: list[tuple[Event, float]] = [
        (PaymentAuthorized("pi_1"), AUTH_AT),
        (DeadlineReached(), DEADLINE),
        (KeyGranted(AGENT), GRANTED_AT),
        (CaptureSucceeded(), ACTIVE_AT),
        (TimeUp(), ENDS_AT),
    ]
    for event, now in path:
        peek = step(peek, event, now).peek
        assert peek.to_bytes() not in seen
        seen.add(peek.to_bytes())


def _tampered(**changes: object) -> bytes:
    raw = orjson.loads(counting_down().to_bytes())
    raw.update(changes)
    return orjson.dumps({k: v for k, v in raw.items() if v is not _DROP})


_DROP = object()


@pytest.mark.parametrize(
    "data",
    [
        b"not json",
        b"[]",
        _tampered(deadline=_DROP),
        _tampered(surprise=1),
        _tampered(price_cents=500.0),
        _tampered(price_cents=True),
        _tampered(refusal_fee_cents="100"),
        _tampered(version=0),
        _tampered(state="paused"),
        _tampered(deadline="soon"),
        _tampered(created_at=False),
        _tampered(id=""),
        _tampered(refused_by=7),
    ],
)
def test_from_bytes_rejects_what_to_bytes_cannot_make(data: bytes) -> None:
    with pytest.raises(ValueError):
        Peek.from_bytes(data)


# --- the protocol document --------------------------------------------------------------------------


def test_protocol_state_table_matches_the_code() -> None:
    """protocol/peek.md lists every transition with the effects it really has, in order."""
    text = (Path(__file__).parents[2] / "protocol" / "peek.md").read_text()
    row = re.compile(r"^\|\s*`(\w+)`\s*\|\s*`(\w+)`[^|]*\|\s*`(\w+)`\s*\|([^|]*)\|", re.M)
    documented = {(s, e): (n, re.findall(r"`(\w+)`", fx)) for s, e, n, fx in row.findall(text)}
    actual = {}
    for (state, event_name), next_state in TRANSITIONS.items():
        event = next(SAMPLE_EVENTS[t] for t in EVENT_TYPES if t.name == event_name)
        peek = reach(state)
        due = peek.wake_at if peek.wake_at is not None else peek.updated_at + 1
        effects = step(peek, event, due if event_name not in ("refuse", "cancel") else peek.updated_at + 1).effects
        actual[(str(state), event_name)] = (str(next_state), [type(e).__name__ for e in effects])
    assert documented == actual
