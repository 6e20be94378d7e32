"""The rules of a saga's states, in one place.

Which states are in flight, retrying or stuck, and what an operator (or a customer) may do to a
saga now: cancel, retry, skip, and if not, why (the code and message the engine's 409 gives).
Every reader asks here: the engine (which decides again under the saga's row lock), the API, the
admin, the overview, the sweeper and the live feed, which sends `allowed_actions` with each saga
so that the dashboard does not derive them again.

The rules depend on the definition only through its properties (the pivot, the pivot's handling
window, `cancel_margin`, `refusals`), never on a definition's or a step's name.

Each rule exists twice, as plain Python on loaded rows and as an ORM filter for the database
(`*_q`, `saga_annotations`); `tests/unit/engine/test_rules.py` holds the two to the same answers.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from django.db.models import BooleanField, Case, Exists, OuterRef, Q, Value, When
from django.db.models.functions import Now

from .definitions import SagaDefinition, for_saga
from .exceptions import OperationNotAllowed
from .models import Saga, SagaStep

State = SagaStep.State
SagaState = Saga.State

# --- States ------------------------------------------------------------------------------------

# A step with an attempt out (its lease, `deadline_at`, decides when the attempt has timed out).
STEP_IN_FLIGHT = frozenset({State.RUNNING, State.RETRYING, State.COMPENSATING, State.CONFIRMING})
# A step whose action is done (and confirmed, for TCC): it counts as progress.
STEP_DONE = frozenset({State.SUCCEEDED, State.CONFIRMED})
# A pivot in one of these states is passed or being passed: no way back.
PIVOT_PASSING = frozenset({State.RUNNING, State.RETRYING})
# Phases that retry on their own policy and wait out a backoff with `next_attempt_at` set.
STEP_SETTLING = frozenset({State.COMPENSATING, State.CONFIRMING})
# A saga the engine still moves (not ended, not parked).
SAGA_ACTIVE = frozenset({SagaState.RUNNING, SagaState.CONFIRMING, SagaState.COMPENSATING})
SAGA_TERMINAL = frozenset(Saga.TERMINAL_STATES)

CANCELLED = "cancelled"  # the failure code of a cancelled saga


def step_in_flight(step: SagaStep) -> bool:
    return step.state in STEP_IN_FLIGHT


def step_backing_off(step: SagaStep) -> bool:
    """Waiting out a backoff before its next attempt (action, compensation or confirm)."""
    return step.state == State.RETRYING or (step.state in STEP_SETTLING and step.next_attempt_at is not None)


def step_lease_passed(step: SagaStep, now: datetime) -> bool:
    return step.state in STEP_IN_FLIGHT and step.deadline_at is not None and step.deadline_at < now


def saga_retrying(saga: Saga, steps: Iterable[SagaStep]) -> bool:
    """Not ended, with a step (any step) waiting out a backoff."""
    return not saga.is_terminal and any(step_backing_off(s) for s in steps)


def saga_stuck(saga: Saga, steps: Iterable[SagaStep], now: datetime) -> bool:
    """Not ended, and parked or with an attempt past its lease (no sweeper or worker about)."""
    if saga.is_terminal:
        return False
    return saga.state == SagaState.PARKED or any(step_lease_passed(s, now) for s in steps)


# The same rules for the database (leases compared with the database clock, as the sweeper does).

STEP_IN_FLIGHT_Q = Q(state__in=STEP_IN_FLIGHT)
STEP_BACKING_OFF_Q = Q(state=State.RETRYING) | Q(state__in=STEP_SETTLING, next_attempt_at__isnull=False)
STEP_LEASE_PASSED_Q = STEP_IN_FLIGHT_Q & Q(deadline_at__lt=Now())
SAGA_ENDED_Q = Q(state__in=SAGA_TERMINAL)


def saga_annotations(using: str = "default") -> dict:
    """`stuck` and `retrying` as annotations of a Saga queryset (`saga_list`, the admin)."""
    steps = SagaStep.objects.using(using).filter(saga=OuterRef("pk"))
    return {
        "stuck": Case(
            When(SAGA_ENDED_Q, then=Value(False)),
            When(state=SagaState.PARKED, then=Value(True)),
            default=Exists(steps.filter(STEP_LEASE_PASSED_Q)),
            output_field=BooleanField(),
        ),
        "retrying": Case(
            When(SAGA_ENDED_Q, then=Value(False)),
            default=Exists(steps.filter(STEP_BACKING_OFF_Q)),
            output_field=BooleanField(),
        ),
    }


# --- Actions -----------------------------------------------------------------------------------

# What a refusal says when the definition has no message of its own for the code.
GENERIC_REFUSALS = {
    "already_cancelled": "This saga is already cancelled",
    "not_cancellable": "This saga can no longer be cancelled (it is {state})",
    "already_shipped": "The saga is past its point of no return; it can no longer be cancelled",
    "shipment_in_progress": "The saga is passing its point of no return right now; it can no longer be cancelled",
    "saga_not_stuck": "Saga is {state} with no step waiting to retry",
    "saga_not_retryable": "A {state} saga cannot be retried",
    "nothing_to_skip": "Step {step!r} is not a parked compensation of this saga",
    "no_parked_compensation": "No compensation of this saga is parked",
}
# What an allowed action does (the dashboard shows it on the button).
ALLOWED = {
    "cancel": "Stop the saga and undo what succeeded",
    "retry_parked": "Resume the parked saga where it stopped",
    "retry_waiting": "Give the steps waiting out a backoff their next attempt now",
    "skip": "Settle a compensation that gave up, after fixing it by hand",
}


@dataclass(frozen=True)
class Verdict:
    """May the action be done now; if not, why (the engine's 409 `code` and `message`).

    `until`: an allowed verdict that time alone will turn into a refusal (`then`: a cancel
    before a pivot scheduled to start) holds until then (database clock). `steps`: for skip,
    the steps whose compensation may be skipped."""

    allowed: bool
    code: str = ""
    message: str = ""
    details: dict = field(default_factory=dict)
    until: datetime | None = None
    then: Verdict | None = None
    steps: tuple[str, ...] = ()

    def __bool__(self) -> bool:
        return self.allowed

    def as_dict(self) -> dict[str, Any]:
        """The wire shape (the live feed's `actions`)."""
        out: dict[str, Any] = {"allowed": self.allowed, "code": self.code or None, "message": self.message}
        out["until"] = self.until.isoformat() if self.until else None
        if self.then is not None:
            out["then"] = {"code": self.then.code, "message": self.then.message}
        return out

    def error(self) -> OperationNotAllowed:
        """The exception the engine raises for this refusal (409)."""
        return OperationNotAllowed(self.code, self.message, details=self.details or None)

    def check(self) -> None:
        """Raise the refusal, if it is one."""
        if not self.allowed:
            raise self.error()


def refusal(definition: SagaDefinition | None, code: str, **fmt) -> Verdict:
    template = ((definition.refusals if definition else None) or {}).get(code) or GENERIC_REFUSALS[code]
    details = {"state": fmt["state"]} if code == "not_cancellable" else {}
    return Verdict(False, code, template.format(**fmt), details=details)


def _definition(saga: Saga, definition: SagaDefinition | None) -> SagaDefinition | None:
    if definition is not None:
        return definition
    try:
        return for_saga(saga)
    except LookupError:
        return None


def cancel_verdict(
    saga: Saga, steps: Iterable[SagaStep], *, now: datetime, definition: SagaDefinition | None = None
) -> Verdict:
    """May the saga be cancelled now: only while running, and before its pivot is passed or
    being passed; for a style that cannot stop a pivot at the last moment (`cancel_margin`),
    not within that margin of the pivot's scheduled start either."""
    definition = _definition(saga, definition)
    if saga.state == SagaState.CANCELLED or (saga.failure or {}).get("code") == CANCELLED:
        return refusal(definition, "already_cancelled")
    if saga.state != SagaState.RUNNING:
        return refusal(definition, "not_cancellable", state=saga.state)
    if definition is None:
        return refusal(definition, "not_cancellable", state=saga.state)
    pivots = {s.name for s in definition.steps if s.pivot}
    until = None
    for step in steps:
        if step.name not in pivots:
            continue
        if step.state == State.SUCCEEDED:
            return refusal(definition, "already_shipped")
        if step.state in PIVOT_PASSING:
            return refusal(definition, "shipment_in_progress")
        if definition.cancel_margin and step.state == State.PENDING and step.next_attempt_at:
            deadline = step.next_attempt_at - timedelta(seconds=definition.cancel_margin)
            if now > deadline:  # the tracker's rule: refused once less than the margin is left
                return refusal(definition, "shipment_in_progress")
            until = deadline if until is None else min(until, deadline)
    then = refusal(definition, "shipment_in_progress") if until else None
    return Verdict(True, message=ALLOWED["cancel"], until=until, then=then)


def retry_verdict(saga: Saga, steps: Iterable[SagaStep], *, definition: SagaDefinition | None = None) -> Verdict:
    """May the saga be retried now: a parked saga always; an active one when one of its action
    steps waits out a backoff (an attempt in flight is left to its lease)."""
    definition = _definition(saga, definition)
    if saga.state == SagaState.PARKED:
        return Verdict(True, message=ALLOWED["retry_parked"])
    if saga.state in SAGA_ACTIVE:
        if any(s.kind == SagaStep.Kind.ACTION and step_backing_off(s) for s in steps):
            return Verdict(True, message=ALLOWED["retry_waiting"])
        return refusal(definition, "saga_not_stuck", state=saga.state)
    return refusal(definition, "saga_not_retryable", state=saga.state)


def skip_verdict(
    saga: Saga, steps: Iterable[SagaStep], step_name: str | None = None, *, definition: SagaDefinition | None = None
) -> Verdict:
    """May a compensation be skipped now: only a parked saga's compensation that gave up.
    Without `step_name`, whether any may be (and which, in `steps`)."""
    definition = _definition(saga, definition)
    steps = list(steps)
    given_up = tuple(s.name for s in steps if s.state == State.COMPENSATION_FAILED)
    if step_name is not None:
        if saga.state != SagaState.PARKED or step_name not in given_up:
            return refusal(definition, "nothing_to_skip", step=step_name)
        return Verdict(True, message=ALLOWED["skip"], steps=(step_name,))
    if saga.state != SagaState.PARKED or not given_up:
        return refusal(definition, "no_parked_compensation")
    return Verdict(True, message=ALLOWED["skip"], steps=given_up)


def allowed_actions(
    saga: Saga, steps: Iterable[SagaStep], *, now: datetime, definition: SagaDefinition | None = None
) -> dict[str, Verdict]:
    """What an operator may do to the saga now: `{"cancel", "retry", "skip"}`, each a Verdict.
    The engine decides again under the row lock; these are its answers for the same rows."""
    steps = list(steps)
    definition = _definition(saga, definition)
    return {
        "cancel": cancel_verdict(saga, steps, now=now, definition=definition),
        "retry": retry_verdict(saga, steps, definition=definition),
        "skip": skip_verdict(saga, steps, definition=definition),
    }


def actions_view(actions: dict[str, Verdict]) -> dict:
    """The wire shape of `allowed_actions` (skip also lists its steps)."""
    view = {kind: verdict.as_dict() for kind, verdict in actions.items()}
    if "skip" in actions:
        view["skip"]["steps"] = list(actions["skip"].steps)
    return view
