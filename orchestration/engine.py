"""The saga engine: start a saga, apply a service's reply, decide what to send next.

Every entry point runs in one transaction on the orchestrator's database with the saga row
locked: it applies the news to the steps, records an event per transition, and writes the next
commands to the outbox, which publishes them after commit. What to do next is decided from the
stored state alone (`_advance`), so a redelivered reply, a restarted worker, the sweeper or an
operator can call it again and get the same answer.

Time comes from the database clock (`db_now`): leases, retry times and the saga deadline are
stored as absolute database times, and the sweeper compares them with the same clock.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta

from django.conf import settings
from django.db import IntegrityError, transaction
from django.db.models.functions import Now

from sagaplatform.kernel import attempts, faults, outbox
from sagaplatform.kernel.clock import db_now
from sagaplatform.kernel.commands import (
    ACTION,
    BUSINESS_FAILURE,
    COMPENSATE,
    CONFIRM,
    ORCHESTRATOR_QUEUE,
    SUCCEEDED,
    TRANSIENT_ERROR,
    Command,
)

from . import deferral, live
from .definitions import SagaDefinition, StepSpec, for_mode, get_definition
from .exceptions import OperationNotAllowed
from .models import Alert, Saga, SagaEvent, SagaStep

logger = logging.getLogger(__name__)

DB = "default"
State = SagaStep.State
IN_FLIGHT = (State.RUNNING, State.RETRYING, State.COMPENSATING, State.CONFIRMING)
DONE = (State.SUCCEEDED, State.CONFIRMED)


@dataclass
class _Run:
    """One engine transaction's working set: the locked saga, its steps, the events to append."""

    saga: Saga
    definition: SagaDefinition
    steps: dict[str, SagaStep]
    now: datetime
    actor: str = "engine"
    events: list[SagaEvent] = field(default_factory=list)
    dirty: set[str] = field(default_factory=set)
    alerts: list[Alert] = field(default_factory=list)

    def record(self, kind: str, *, step: SagaStep | None = None, from_state: str = "", data: dict | None = None):
        self.saga.version += 1
        if step is not None:
            self.dirty.add(step.name)
        self.events.append(
            SagaEvent(
                saga=self.saga,
                seq=self.saga.version,
                step=step.name if step else "",
                kind=kind,
                from_state=from_state,
                to_state=step.state if step else self.saga.state,
                data=data or {},
                actor=self.actor,
                created_at=self.now,
            )
        )
        logger.info(
            "saga %s %s %s",
            self.saga.id,
            kind,
            step.name if step else "",
            extra={"saga_id": str(self.saga.id), "step": step.name if step else "", "event": kind},
        )

    def flush(self) -> None:
        self.saga.save(using=DB)
        for name in self.dirty:
            self.steps[name].save(using=DB)
        SagaEvent.objects.using(DB).bulk_create(self.events)
        Alert.objects.using(DB).bulk_create(self.alerts)
        live.publish(self)

    def action_steps(self) -> list[tuple[StepSpec, SagaStep]]:
        return [(spec, self.steps[spec.name]) for spec in self.definition.steps]

    def failure_steps(self) -> list[tuple[StepSpec, SagaStep]]:
        return [(spec, self.steps[spec.name]) for spec in self.definition.on_failure]

    def past_pivot(self) -> bool:
        return any(spec.pivot and step.state == State.SUCCEEDED for spec, step in self.action_steps())


# --- Entry points ------------------------------------------------------------------------------


def saga_start(*, saga_id: uuid.UUID | str, definition: str, context: dict, cancel: dict | None = None) -> bool:
    """Create and start a saga. Idempotent on `saga_id`: a repeated start message does nothing.

    With `cancel`, the saga is created already cancelled (a cancel that overtook the start)."""
    try:
        with transaction.atomic(using=DB):
            if Saga.objects.using(DB).filter(id=saga_id).exists():
                return False
            spec = get_definition(definition)
            now = db_now(DB)
            saga = Saga.objects.using(DB).create(
                id=saga_id,
                definition=definition,
                context=context,
                deadline_at=now + timedelta(seconds=spec.effective_deadline()),
            )
            steps = SagaStep.objects.using(DB).bulk_create(
                [
                    SagaStep(saga=saga, name=s.name, kind=kind, position=i, service=s.service)
                    for kind, group in ((SagaStep.Kind.ACTION, spec.steps), (SagaStep.Kind.ON_FAILURE, spec.on_failure))
                    for i, s in enumerate(group)
                ]
            )
            run = _Run(saga=saga, definition=spec, steps={s.name: s for s in steps}, now=now)
            run.record("saga_created", data={"definition": definition})
            saga.start()
            run.record("saga_started", from_state=Saga.State.PENDING)
            if cancel:
                saga.begin_compensation(failure=cancel)
                run.record("saga_cancel_requested", from_state=Saga.State.RUNNING, data={"reason": cancel["message"]})
            _advance(run)
            run.flush()
            return True
    except IntegrityError:
        # The same start message, delivered twice at once: the other one created it.
        if Saga.objects.using(DB).filter(id=saga_id).exists():
            return False
        raise


def _locked(saga_id, apply: Callable[[_Run], bool], *, actor: str = "engine", skip_locked: bool = False) -> bool:
    """Run `apply` on the locked saga; if it changed anything, advance and save. Returns that."""
    with transaction.atomic(using=DB):
        # The database clock comes with the row lock: one round trip for both.
        rows = Saga.objects.using(DB).select_for_update(skip_locked=skip_locked).filter(id=saga_id)
        saga = rows.annotate(db_now=Now()).first()
        if saga is None:
            return False
        steps = {s.name: s for s in SagaStep.objects.using(DB).filter(saga=saga)}
        run = _Run(saga=saga, definition=get_definition(saga.definition), steps=steps, now=saga.db_now, actor=actor)
        if not apply(run):
            return False
        _advance(run)
        run.flush()
        return True


def reply_handle(*, reply: dict) -> bool:
    """Apply one service reply to its saga. Stale or duplicate replies change nothing."""

    def apply(run: _Run) -> bool:
        step = run.steps.get(reply["step"])
        if step is None:
            logger.warning("reply for unknown step %s of saga %s", reply.get("step"), run.saga.id)
            return False
        handler = {ACTION: _apply_action_reply, COMPENSATE: _apply_compensation_reply, CONFIRM: _apply_confirm_reply}
        if not handler[reply["op"]](run, step, reply):
            logger.info("stale reply ignored", extra={"saga_id": str(run.saga.id), "step": step.name})
            return False
        return True

    return _locked(reply["saga_id"], apply)


def attempt_in_flight(step: SagaStep) -> tuple[str, int]:
    """The op and attempt number of the command a step in flight waits for."""
    return {
        State.COMPENSATING: (COMPENSATE, step.compensation_attempts),
        State.CONFIRMING: (CONFIRM, step.confirm_attempts),
    }.get(step.state, (ACTION, step.attempts))


def step_lease_expire(
    *, saga_id, step_name: str, mark: attempts.Mark | None = None, known: bool = False, queue_idle=None
) -> bool:
    """The sweeper's verdict on an attempt that outlived its lease: a transient failure, unless
    the attempt's mark (`known`: the sweeper could read the marks) shows that it is still
    queued, running within its time, or answered with the answer still queued."""

    def apply(run: _Run) -> bool:
        step = run.steps.get(step_name)
        if step is None or not step.deadline_at or step.deadline_at > run.now:
            return False  # it moved on since the sweeper looked
        if run.definition.style == "choreography":
            from . import tracker

            return tracker.nudge(run, step)
        if step.state not in IN_FLIGHT:
            return False
        if known and step.sent_at and _lease_extend(run, step, mark, queue_idle):
            return True
        op, attempt, handler = {
            State.COMPENSATING: (COMPENSATE, step.compensation_attempts, _apply_compensation_reply),
            State.CONFIRMING: (CONFIRM, step.confirm_attempts, _apply_confirm_reply),
        }.get(step.state, (ACTION, step.attempts, _apply_action_reply))
        timeout = run.definition.step(step.name).effective_timeout()
        error = {"code": "step_timeout", "message": f"No reply within {timeout:g} s (attempt {attempt})"}
        run.record("step_timed_out", step=step, from_state=step.state, data={"attempt": attempt, "op": op})
        reply = {"op": op, "attempt": attempt, "status": TRANSIENT_ERROR, "error": error}
        return handler(run, step, reply)

    return _locked(saga_id, apply, skip_locked=True)


def saga_deadline_expire(*, saga_id) -> bool:
    """Past its global deadline: compensate before the pivot; after it, only go forward."""

    def apply(run: _Run) -> bool:
        saga = run.saga
        if saga.state != Saga.State.RUNNING or not saga.deadline_at or saga.deadline_at > run.now:
            return False
        saga.deadline_at = None
        if run.past_pivot():
            run.record("deadline_passed_after_pivot", data={"policy": "forward"})
            return True
        saga.begin_compensation(failure={"code": "deadline_exceeded", "message": "The order took too long to complete"})
        run.record("saga_compensating", from_state=Saga.State.RUNNING, data={"failure": saga.failure})
        # Nothing more is worth waiting for: expire the leases of attempts still in flight,
        # with no allowance for a queue.
        for _, step in run.action_steps():
            if step.state in (State.RUNNING, State.RETRYING):
                step.deadline_at, step.sent_at = run.now, None
                run.dirty.add(step.name)
        return True

    return _locked(saga_id, apply, skip_locked=True)


def saga_advance(*, saga_id) -> bool:
    """Re-decide from the stored state (the sweeper, for steps whose start time has come)."""
    return _locked(saga_id, lambda run: True, skip_locked=True)


# --- Cancellation -----------------------------------------------------------------------------

CANCELLED = "cancelled"


def saga_cancel(*, saga_id, context: dict, actor: str, reason: str = "") -> Saga:
    """Cancel an order's saga: stop dispatching, let steps in flight finish (or time out), and
    compensate what succeeded. Refused (409) once the point of no return is passed or being
    passed, and for a saga that already ended. Decided under the saga's row lock, so a cancel
    racing a step's reply, or another cancel, sees a consistent state."""
    failure = {"code": CANCELLED, "message": reason or "Cancelled at the customer's request", "by": actor}
    outcome: dict = {}

    def apply(run: _Run) -> bool:
        saga = outcome["saga"] = run.saga
        if saga.state == Saga.State.CANCELLED or (saga.failure or {}).get("code") == CANCELLED:
            raise OperationNotAllowed("already_cancelled", "This order is already cancelled")
        if saga.state != Saga.State.RUNNING:  # (a saga is started in the transaction that creates it)
            raise OperationNotAllowed(
                "not_cancellable",
                f"This order can no longer be cancelled (it is {saga.state})",
                details={"state": saga.state},
            )
        for spec, step in run.action_steps():
            if spec.pivot and step.state == State.SUCCEEDED:
                raise OperationNotAllowed("already_shipped", "The order has shipped; it can no longer be cancelled")
            if spec.pivot and step.state in (State.RUNNING, State.RETRYING):
                raise OperationNotAllowed(
                    "shipment_in_progress",
                    "The parcel is leaving the warehouse right now; it can no longer be cancelled",
                )
        if run.definition.style == "choreography":
            from . import tracker

            tracker.cancel(run, failure)
            return True
        saga.begin_compensation(failure=failure)
        run.record("saga_cancel_requested", from_state=Saga.State.RUNNING, data={"reason": failure["message"]})
        return True

    if _locked(saga_id, apply, actor=actor):
        return outcome["saga"]
    # The saga has not started yet (its start message is on its way): start it cancelled, so
    # the late start message finds it and does nothing, and the order is closed.
    definition = for_mode(context.get("mode", "orchestrated"))
    if definition.style == "choreography":
        from . import tracker

        tracker.ensure_saga(saga_id=saga_id, context=context)
    elif saga_start(saga_id=saga_id, definition=definition.name, context=context, cancel=failure):
        return Saga.objects.using(DB).get(id=saga_id)
    # The start message won the race and the saga now runs: decide on it like any other.
    _locked(saga_id, apply, actor=actor)
    return outcome["saga"]


# --- Operator actions -------------------------------------------------------------------------


def saga_retry(*, saga_id, actor: str, reason: str = "") -> Saga:
    """Resume a parked or stuck saga from where it stopped. Safe to call twice at once: the
    second caller finds the saga no longer parked (or its steps no longer stuck) and is refused."""
    outcome: dict = {}

    def apply(run: _Run) -> bool:
        saga = run.saga
        outcome["saga"] = saga
        if saga.state == Saga.State.PARKED and run.definition.style == "choreography":
            from . import tracker

            run.record("operator_retry", from_state=Saga.State.PARKED, data={"reason": reason})
            tracker.operator_retry(run)
            _resolve_alerts(run)
            return True
        if saga.state == Saga.State.PARKED:
            given_up = [s for _, s in run.action_steps() if s.state == State.COMPENSATION_FAILED]
            unconfirmed = [s for _, s in run.action_steps() if s.state == State.CONFIRM_FAILED]
            if unconfirmed:
                saga.resume_confirm()
                run.record("operator_retry", from_state=Saga.State.PARKED, data={"reason": reason})
                for step in unconfirmed:
                    spec = run.definition.step(step.name)
                    step.retry_confirm()
                    _lease(run, step, spec)
                    run.record(
                        "confirm_started",
                        step=step,
                        from_state=State.CONFIRM_FAILED,
                        data={"attempt": step.confirm_attempts},
                    )
                    _send(run, step, spec, CONFIRM, attempt=step.confirm_attempts)
            elif given_up:
                saga.resume_compensation()
                run.record("operator_retry", from_state=Saga.State.PARKED, data={"reason": reason})
                for step in given_up:
                    step.retry_compensation()
                    _lease(run, step, run.definition.step(step.name))
                    run.record(
                        "compensation_started",
                        step=step,
                        from_state=State.COMPENSATION_FAILED,
                        data={"attempt": step.compensation_attempts},
                    )
                    _send(run, step, run.definition.step(step.name), COMPENSATE, attempt=step.compensation_attempts)
            else:
                confirmed = run.definition.style == "tcc" and all(
                    step.state == State.CONFIRMED for spec, step in run.action_steps() if spec.confirm
                )
                # After TCC's confirms the saga is in its confirm phase, not trying any more.
                if confirmed:
                    saga.resume_confirm()
                elif saga.failure:  # parked while compensating (saga_park_broken)
                    saga.resume_compensation()
                else:
                    saga.resume_forward()
                run.record("operator_retry", from_state=Saga.State.PARKED, data={"reason": reason})
                for spec, step in run.action_steps():
                    if step.state == State.FAILED and saga.state != Saga.State.COMPENSATING:
                        _retry_now(run, spec, step)
            _resolve_alerts(run)
            return True
        if saga.state in (Saga.State.RUNNING, Saga.State.COMPENSATING, Saga.State.CONFIRMING):
            # Steps waiting out a backoff get their next attempt now. (An attempt in flight is
            # left alone: its lease decides.) Once retried a step waits for nothing, so a second
            # operator clicking at the same moment finds nothing to retry.
            stuck = [
                (spec, s)
                for spec, s in run.action_steps()
                if s.state == State.RETRYING
                or (s.state in (State.COMPENSATING, State.CONFIRMING) and s.next_attempt_at)
            ]
            if not stuck:
                raise OperationNotAllowed("saga_not_stuck", f"Saga is {saga.state} with no step waiting to retry")
            run.record("operator_retry", data={"reason": reason, "steps": [s.name for _, s in stuck]})
            for spec, step in stuck:
                if step.state == State.COMPENSATING:
                    step.schedule_compensation_retry(error=step.error or {}, next_attempt_at=None)
                    _lease(run, step, spec)
                    _send(run, step, spec, COMPENSATE, attempt=step.compensation_attempts)
                elif step.state == State.CONFIRMING:
                    step.schedule_confirm_retry(error=step.error or {}, next_attempt_at=None)
                    _lease(run, step, spec)
                    _send(run, step, spec, CONFIRM, attempt=step.confirm_attempts)
                else:
                    _retry_now(run, spec, step)
            return True
        raise OperationNotAllowed("saga_not_retryable", f"A {saga.state} saga cannot be retried")

    _locked(saga_id, apply, actor=actor)
    if "saga" not in outcome:
        raise OperationNotAllowed("not_found", "No such saga.", status=404)
    return outcome["saga"]


def saga_skip(*, saga_id, step_name: str, actor: str, reason: str) -> Saga:
    """Settle a parked compensation by hand (the operator fixed it outside the platform)."""
    if not reason.strip():
        raise OperationNotAllowed("reason_required", "Skipping a compensation needs a reason", status=400)
    outcome: dict = {}

    def apply(run: _Run) -> bool:
        outcome["saga"] = run.saga
        step = run.steps.get(step_name)
        if run.saga.state != Saga.State.PARKED or step is None or step.state != State.COMPENSATION_FAILED:
            raise OperationNotAllowed(
                "nothing_to_skip", f"Step {step_name!r} is not a parked compensation of this saga"
            )
        step.skip_compensation()
        run.record("compensation_skipped", step=step, from_state=State.COMPENSATION_FAILED, data={"reason": reason})
        if run.definition.style == "choreography":
            from . import tracker

            tracker.announce_skip(run, step)
        if not any(s.state == State.COMPENSATION_FAILED for _, s in run.action_steps()):
            run.saga.resume_compensation()
            run.record("saga_resumed", from_state=Saga.State.PARKED, data={"reason": reason})
            _resolve_alerts(run)
        return True

    _locked(saga_id, apply, actor=actor)
    if "saga" not in outcome:
        raise OperationNotAllowed("not_found", "No such saga.", status=404)
    return outcome["saga"]


def _retry_now(run: _Run, spec: StepSpec, step: SagaStep) -> None:
    before = step.state
    step.retry_now()
    step.finished_at = None
    _lease(run, step, spec)
    run.record("step_started", step=step, from_state=before, data={"attempt": step.attempts, "by": "operator"})
    _send(run, step, spec, ACTION, attempt=step.attempts)


def _resolve_alerts(run: _Run) -> None:
    Alert.objects.using(DB).filter(saga=run.saga, resolved_at__isnull=True).update(
        resolved_at=run.now, resolved_by=run.actor
    )


# --- Applying replies -------------------------------------------------------------------------


def _lease(run: _Run, step: SagaStep, spec: StepSpec, *, delay: float = 0.0) -> None:
    step.sent_at = run.now + timedelta(seconds=delay)
    step.deadline_at = step.sent_at + timedelta(seconds=spec.effective_timeout())
    run.dirty.add(step.name)


def _lease_extend(run: _Run, step: SagaStep, mark: attempts.Mark | None, queue_idle) -> bool:
    """Extend an expired lease whose attempt is not late: its command still waits in the
    service's queue, it started less than a timeout ago, or it answered and the answer still
    waits in the orchestrator's queue. A command or answer the broker lost is sent again (the
    same attempt: the barrier replays or waits for it) when nothing is queued ahead of it. Past
    SAGA_QUEUE_WAIT_LIMIT from the sending, the attempt counts as timed out after all."""
    spec = run.definition.step(step.name)
    timeout = spec.effective_timeout()
    waited = (run.now - step.sent_at).total_seconds()
    op, attempt = attempt_in_flight(step)
    if mark is not None and mark.state == attempts.STARTED:
        if mark.age >= timeout:
            return False  # it has run out its own time: a hang
        step.deadline_at = run.now + timedelta(seconds=timeout - mark.age)
        reason, resend = "running", False
    else:
        if waited >= settings.SAGA_QUEUE_WAIT_LIMIT:
            return False
        reason = "queued" if mark is None else "answer_queued"
        resend = bool(queue_idle and queue_idle(spec.service if mark is None else ORCHESTRATOR_QUEUE))
        step.deadline_at = run.now + timedelta(seconds=timeout)
    run.dirty.add(step.name)
    data = {"attempt": attempt, "op": op, "reason": reason, "waited": round(waited, 3), "resent": resend}
    run.record("lease_extended", step=step, from_state=step.state, data=data)
    if resend:
        _send(run, step, spec, op, attempt=attempt)
    return True


def _apply_action_reply(run: _Run, step: SagaStep, reply: dict) -> bool:
    if step.state not in (State.RUNNING, State.RETRYING) or reply.get("attempt") != step.attempts:
        return False
    spec = run.definition.step(step.name)
    status = reply["status"]
    deferral.record_reply(spec.service, status)  # circuit breaker: count the outcome
    before = step.state
    data = {"attempt": step.attempts, "replayed": bool(reply.get("replayed"))}
    if status == SUCCEEDED:
        step.succeed(result=reply.get("result") or {})
        step.finished_at, step.deadline_at = run.now, None
        run.record("step_succeeded", step=step, from_state=before, data=data)
        if spec.pivot and run.saga.deadline_at:
            run.saga.deadline_at = None  # past the point of no return, the deadline is moot
        return True

    error = reply.get("error") or {"code": "unknown", "message": "no error given"}
    if status == BUSINESS_FAILURE:
        # Definitive: the barrier stored the failure with none of its effects, so there is
        # nothing of this step to compensate.
        step.fail(error={**error, "definitive": True})
        step.finished_at, step.deadline_at = run.now, None
        run.record("step_failed", step=step, from_state=before, data={**data, "error": error})
        return True

    # Once the saga unwinds, a forward step stops retrying; its failure steps keep going (and
    # so do the steps after TCC's confirms: the saga is not unwinding then).
    unwinding = run.saga.state == Saga.State.COMPENSATING and step.kind == SagaStep.Kind.ACTION
    hold = 0.0 if unwinding else deferral.hold_retry(run, step, spec)  # breaker open: not counted
    if not unwinding and spec.retry.allows_another(step.attempts - step.deferrals):
        delay = max(spec.retry.delay(step.attempts), hold)
        step.schedule_retry(error=error, next_attempt_at=run.now + timedelta(seconds=delay))
        _lease(run, step, spec, delay=delay)
        run.record(
            "retry_scheduled",
            step=step,
            from_state=before,
            data={**data, "error": error, "delay": round(delay, 3), "next_attempt": step.attempts},
        )
        _send(run, step, spec, ACTION, attempt=step.attempts, delay=delay)
        return True

    # Out of attempts (or the saga is already unwinding). The last attempt may still have
    # committed somewhere, so the step is compensated like a success: the barrier makes that a
    # no-op if it never ran, and refuses the action should it arrive later.
    _abandon(run, step, error, reason="abandoned" if unwinding else "retries_exhausted")
    return True


def _abandon(run: _Run, step: SagaStep, error: dict, *, reason: str) -> None:
    before = step.state
    step.fail(
        error={
            "code": reason,
            "message": f"{step.name} failed after {step.attempts} attempt(s): {error.get('message', '')}",
            "details": {"last_error": error},
        }
    )
    step.finished_at, step.deadline_at = run.now, None
    run.record(
        "step_failed", step=step, from_state=before, data={"attempt": step.attempts, "error": error, "reason": reason}
    )


@dataclass(frozen=True)
class _Settling:
    """A phase whose every step must eventually succeed: compensations, and TCC's confirms.
    Whatever the error, it is retried on its own policy; past it, the saga is parked."""

    state: str
    attempts: str  # the SagaStep counter
    policy: str  # the StepSpec retry policy
    op: str
    finish: str  # the SagaStep transitions
    retry: str
    give_up: str
    done: str  # the event kinds
    retrying: str
    failed: str


COMPENSATION = _Settling(
    State.COMPENSATING, "compensation_attempts", "compensation_retry", COMPENSATE,
    "finish_compensation", "schedule_compensation_retry", "give_up_compensation",
    "step_compensated", "compensation_retry_scheduled", "compensation_failed",
)  # fmt: skip
CONFIRMATION = _Settling(
    State.CONFIRMING, "confirm_attempts", "confirm_retry", CONFIRM,
    "finish_confirm", "schedule_confirm_retry", "give_up_confirm",
    "step_confirmed", "confirm_retry_scheduled", "confirm_failed",
)  # fmt: skip


def _apply_compensation_reply(run: _Run, step: SagaStep, reply: dict) -> bool:
    return _apply_settling_reply(run, step, reply, COMPENSATION)


def _apply_confirm_reply(run: _Run, step: SagaStep, reply: dict) -> bool:
    return _apply_settling_reply(run, step, reply, CONFIRMATION)


def _apply_settling_reply(run: _Run, step: SagaStep, reply: dict, phase: _Settling) -> bool:
    attempt = getattr(step, phase.attempts)
    if step.state != phase.state or reply.get("attempt") != attempt:
        return False
    spec = run.definition.step(step.name)
    data = {"attempt": attempt, "replayed": bool(reply.get("replayed"))}
    if reply["status"] == SUCCEEDED:
        getattr(step, phase.finish)()
        step.finished_at, step.deadline_at = run.now, None
        if phase is COMPENSATION:
            data["null_compensation"] = reply.get("barrier") == "null_compensation"
        run.record(phase.done, step=step, from_state=phase.state, data=data)
        return True
    error = reply.get("error") or {"code": "unknown", "message": "no error given"}
    policy = getattr(spec, phase.policy)
    if policy.allows_another(attempt):
        delay = policy.delay(attempt)
        getattr(step, phase.retry)(error=error, next_attempt_at=run.now + timedelta(seconds=delay))
        _lease(run, step, spec, delay=delay)
        run.record(
            phase.retrying, step=step, from_state=phase.state, data={**data, "error": error, "delay": round(delay, 3)}
        )
        _send(run, step, spec, phase.op, attempt=getattr(step, phase.attempts), delay=delay)
        return True
    getattr(step, phase.give_up)(error=error)
    step.deadline_at = None
    run.record(phase.failed, step=step, from_state=phase.state, data={**data, "error": error})
    return True


# --- Deciding what comes next -----------------------------------------------------------------


def _needs_compensation(spec: StepSpec, step: SagaStep) -> bool:
    if not spec.compensation:
        return False
    if step.state == State.SUCCEEDED:
        return True
    return step.state == State.FAILED and not (step.error or {}).get("definitive")


def _settled(spec: StepSpec, step: SagaStep) -> bool:
    """Nothing of this step is in flight or left to undo."""
    if step.state in (State.PENDING, State.COMPENSATED, State.SKIPPED):
        return True
    if step.state in (State.SUCCEEDED, State.FAILED):
        return not _needs_compensation(spec, step)
    return False


def _advance(run: _Run) -> None:
    if run.definition.style == "choreography":
        return  # no coordinator: the services decide, the tracker records (orchestration/tracker.py)
    if run.definition.style == "tcc":
        _advance_tcc(run)
        return
    saga = run.saga
    if saga.state == Saga.State.RUNNING:
        failed = [(spec, step) for spec, step in run.action_steps() if step.state == State.FAILED]
        unknown_pivot = [s for spec, s in failed if spec.pivot and not (s.error or {}).get("definitive")]
        if failed and (run.past_pivot() or unknown_pivot):
            # Forward only: past the point of no return, or not knowing whether we passed it.
            _park(run, f"{failed[0][1].name} failed at or after the point of no return; retry it once fixed")
        elif failed:
            error = failed[0][1].error or {}
            saga.begin_compensation(
                failure={"step": failed[0][1].name, "code": error.get("code"), "message": error.get("message")}
            )
            run.record("saga_compensating", from_state=Saga.State.RUNNING, data={"failure": saga.failure})
        else:
            _dispatch_ready(run, run.action_steps())
            if all(step.state == State.SUCCEEDED for _, step in run.action_steps()):
                saga.complete()
                saga.finished_at, saga.deadline_at = run.now, None
                run.record("saga_completed", from_state=Saga.State.RUNNING)
            return
    if saga.state == Saga.State.COMPENSATING:
        _advance_compensation(run)


def _advance_tcc(run: _Run) -> None:
    """Try every participant at once; if all tried, confirm all (no way back); if any try
    failed, cancel all, including tries still in flight (the barrier refuses a try that arrives
    after its cancel). The other steps run once every participant is confirmed."""
    saga = run.saga
    participants = [(spec, step) for spec, step in run.action_steps() if spec.confirm]
    followers = [(spec, step) for spec, step in run.action_steps() if not spec.confirm]
    if saga.state == Saga.State.RUNNING:
        failed = [step for _, step in participants if step.state == State.FAILED]
        if failed:
            error = failed[0].error or {}
            saga.begin_compensation(
                failure={"step": failed[0].name, "code": error.get("code"), "message": error.get("message")}
            )
            run.record("saga_compensating", from_state=Saga.State.RUNNING, data={"failure": saga.failure})
        else:
            _dispatch_ready(run, participants)
            if all(step.state == State.SUCCEEDED for _, step in participants):
                saga.begin_confirm()
                saga.deadline_at = None  # decided: from here only forward
                run.record("saga_confirming", from_state=Saga.State.RUNNING)
                for spec, step in participants:
                    step.begin_confirm()
                    _lease(run, step, spec)
                    run.record("confirm_started", step=step, from_state=State.SUCCEEDED, data={"attempt": 1})
                    _send(run, step, spec, CONFIRM, attempt=1)
            return
    if saga.state == Saga.State.CONFIRMING:
        if any(step.state == State.CONFIRM_FAILED for _, step in participants):
            _park(run, "A confirm keeps failing; the transaction is decided, retry it once fixed")
            return
        if not all(step.state == State.CONFIRMED for _, step in participants):
            return
        _dispatch_ready(run, followers)
        if any(step.state == State.FAILED for _, step in followers):
            _park(run, "A step after the confirms failed; retry it once fixed")
        elif all(step.state == State.SUCCEEDED for _, step in followers):
            saga.complete()
            saga.finished_at = run.now
            run.record("saga_completed", from_state=Saga.State.CONFIRMING)
        return
    if saga.state == Saga.State.COMPENSATING:
        for spec, step in participants:
            in_flight = step.state in (State.RUNNING, State.RETRYING)
            if in_flight or _needs_compensation(spec, step):
                before = step.state
                step.begin_compensation()
                _lease(run, step, spec)
                run.record(
                    "compensation_started",
                    step=step,
                    from_state=before,
                    data={"attempt": 1, "cancel_in_flight": in_flight},
                )
                _send(run, step, spec, COMPENSATE, attempt=1)
        _advance_compensation(run)


def _park(run: _Run, message: str) -> None:
    before = run.saga.state
    run.saga.park()
    run.saga.deadline_at = None
    run.record("saga_parked", from_state=before, data={"message": message})
    run.alerts.append(Alert(saga=run.saga, kind=Alert.Kind.SAGA_PARKED, message=message[:500]))
    logger.error("saga %s parked: %s", run.saga.id, message, extra={"saga_id": str(run.saga.id)})


def _dispatch_ready(run: _Run, steps: list[tuple[StepSpec, SagaStep]]) -> None:
    for spec, step in steps:
        if step.state == State.PENDING and all(run.steps[d].state in DONE for d in spec.depends_on):
            wait = spec.start_delay()
            if wait and step.next_attempt_at is None:
                # Ready, but starts after a window (the sweeper starts it when due). Until then it
                # is as cancellable as a step that never started.
                step.next_attempt_at = run.now + timedelta(seconds=wait)
                run.record("step_scheduled", step=step, from_state=State.PENDING, data={"starts_in": wait})
                continue
            if step.next_attempt_at and step.next_attempt_at > run.now:
                continue
            if run.saga.state == Saga.State.RUNNING and deferral.defer_start(run, step, spec):
                continue  # its service's circuit breaker refuses calls: wait, attempt nothing
            step.dispatch()
            step.started_at = run.now
            _lease(run, step, spec)
            run.record("step_started", step=step, from_state=State.PENDING, data={"attempt": 1})
            _send(run, step, spec, ACTION, attempt=1)


def _advance_compensation(run: _Run) -> None:
    saga = run.saga
    # A forward step waiting for its next attempt will not get it: give it up now, so that it
    # is compensated (a no-op if its retry never ran, and the barrier refuses the retry later).
    for _, step in run.action_steps():
        if step.state == State.RETRYING:
            _abandon(run, step, step.error or {}, reason="abandoned")
    # Reverse dependency order: a step is undone only once everything that depended on it is.
    for spec, step in reversed(run.action_steps()):
        if not _needs_compensation(spec, step):
            continue
        if all(_settled(dep, run.steps[dep.name]) for dep in run.definition.dependents(spec.name)):
            before = step.state
            step.begin_compensation()
            _lease(run, step, spec)
            run.record("compensation_started", step=step, from_state=before, data={"attempt": 1})
            _send(run, step, spec, COMPENSATE, attempt=1)

    given_up = [step.name for _, step in run.action_steps() if step.state == State.COMPENSATION_FAILED]
    if given_up:
        _park(run, f"Compensation of {', '.join(given_up)} keeps failing; retry it or skip it with a reason")
        return
    if not all(_settled(spec, step) for spec, step in run.action_steps()):
        return

    # Everything undone: tell the order and the customer why.
    finalizers = run.failure_steps()
    _dispatch_ready(run, finalizers)
    gave_up = [step for _, step in finalizers if step.state == State.FAILED]
    if gave_up:
        saga.fail(failure={**(saga.failure or {}), "finalizer": gave_up[0].name})
        saga.finished_at = run.now
        run.record("saga_failed", from_state=Saga.State.COMPENSATING, data={"step": gave_up[0].name})
    elif all(step.state == State.SUCCEEDED for _, step in finalizers):
        if (saga.failure or {}).get("code") == CANCELLED:
            saga.finish_cancellation()
            run.record("saga_cancelled", from_state=Saga.State.COMPENSATING)
        else:
            saga.finish_compensation()
            run.record("saga_compensated", from_state=Saga.State.COMPENSATING)
        saga.finished_at = run.now


def _send(run: _Run, step: SagaStep, spec: StepSpec, op: str, *, attempt: int, delay: float = 0.0) -> None:
    faults.arm_after_commit(faults.ORCHESTRATOR, step.name)  # chaos: die between the commit and the publish
    payload = {key: run.saga.context.get(key) for key in spec.inputs}
    if step.kind == SagaStep.Kind.ON_FAILURE:
        payload["failure"] = run.saga.failure
    command = Command(
        saga_id=run.saga.id,
        step=step.name,
        op=op,
        operation={ACTION: spec.action, COMPENSATE: spec.compensation, CONFIRM: spec.confirm}[op],
        attempt=attempt,
        payload=payload,
    )
    outbox.enqueue(
        using=DB,
        task=f"{spec.service}.execute",
        queue=spec.service,
        payload=command.to_message(),
        delay=delay,
        now=run.now,
    )


def saga_park_broken(*, saga_id, error: Exception) -> bool:
    """Park a saga the engine failed on (an unknown definition, a step it no longer has), with
    an alert, so that the sweeper leaves it out instead of failing on it at every run. Written
    without the definition, which may be what is missing."""
    message = f"The engine failed on this saga ({type(error).__name__}: {error}); fix the cause, then retry it"
    with transaction.atomic(using=DB):
        rows = Saga.objects.using(DB).select_for_update(skip_locked=True).filter(id=saga_id)
        saga = rows.annotate(db_now=Now()).first()
        if saga is None or saga.state not in (Saga.State.RUNNING, Saga.State.CONFIRMING, Saga.State.COMPENSATING):
            return False
        before = saga.state
        saga.park()
        saga.deadline_at = None
        saga.version += 1
        saga.save(using=DB)
        SagaEvent.objects.using(DB).create(
            saga=saga,
            seq=saga.version,
            kind="saga_parked",
            from_state=before,
            to_state=saga.state,
            data={"message": message, "error": type(error).__name__},
            created_at=saga.db_now,
        )
        Alert.objects.using(DB).create(saga=saga, kind=Alert.Kind.SAGA_PARKED, message=message[:500])
    logger.error("saga %s parked: %s", saga_id, message, extra={"saga_id": str(saga_id)})
    return True
