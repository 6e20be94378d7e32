"""Applying a service's reply to a coordinated saga's step: success, a definitive business
failure, or a transient error (retried on the step's policy, then given up). Compensations and
TCC's confirms settle the same way (`apply_settling_reply`). A lease that expired is the same as
a transient error, unless the attempt is still queued or running (`lease_extend`).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta

from django.conf import settings

from sagaplatform.kernel import attempts
from sagaplatform.kernel.commands import (
    ACTION,
    BUSINESS_FAILURE,
    COMPENSATE,
    CONFIRM,
    ORCHESTRATOR_QUEUE,
    SUCCEEDED,
    TRANSIENT_ERROR,
)

from ..models import Saga, SagaStep
from . import deferral
from .run import IN_FLIGHT, JSON, QueueIdle, Run, State, attempt_in_flight, lease, locked, locked_many, send

logger = logging.getLogger(__name__)


def reply_handle(*, reply: JSON) -> bool:
    """Apply one service reply to its saga. Stale or duplicate replies change nothing."""
    return locked(reply["saga_id"], _applier(reply))


def reply_handle_many(*, replies: list[JSON], contexts: list[JSON | None] | None = None) -> list[bool | None]:
    """Apply a batch of replies in one transaction (`run.locked_many`), each in the trace
    context it came with: for each, whether it changed its saga, or None if it failed (alone;
    the caller sends it on as a message)."""
    contexts = contexts or [None] * len(replies)
    return locked_many(
        [
            (str(reply.get("saga_id")), _applier(reply), context)
            for reply, context in zip(replies, contexts, strict=True)
        ]
    )


def _applier(reply: JSON) -> Callable[[Run], bool]:
    def apply(run: Run) -> bool:
        step = run.steps.get(reply["step"])
        if step is None:
            logger.warning("reply for unknown step %s of saga %s", reply.get("step"), run.saga.id)
            return False
        handler = {ACTION: apply_action_reply, COMPENSATE: apply_compensation_reply, CONFIRM: apply_confirm_reply}
        if not handler[reply["op"]](run, step, reply):
            logger.info("stale reply ignored", extra={"saga_id": str(run.saga.id), "step": step.name})
            return False
        return True

    return apply


def expire_lease(
    run: Run, step: SagaStep, *, mark: attempts.Mark | None, known: bool, queue_idle: QueueIdle | None
) -> bool:
    """The verdict on an attempt that outlived its lease: a transient failure, unless the
    attempt's mark (`known`: the sweeper could read the marks) shows that it is still queued,
    running within its time, or answered with the answer still queued."""
    if step.state not in IN_FLIGHT:
        return False
    if known and step.sent_at and lease_extend(run, step, mark, queue_idle):
        return True
    op, attempt, handler = {
        State.COMPENSATING: (COMPENSATE, step.compensation_attempts, apply_compensation_reply),
        State.CONFIRMING: (CONFIRM, step.confirm_attempts, apply_confirm_reply),
    }.get(step.state, (ACTION, step.attempts, apply_action_reply))
    timeout = run.definition.step(step.name).effective_timeout()
    error = {"code": "step_timeout", "message": f"No reply within {timeout:g} s (attempt {attempt})"}
    run.record("step_timed_out", step=step, from_state=step.state, data={"attempt": attempt, "op": op})
    reply = {"op": op, "attempt": attempt, "status": TRANSIENT_ERROR, "error": error}
    return handler(run, step, reply)


def lease_extend(run: Run, step: SagaStep, mark: attempts.Mark | None, queue_idle: QueueIdle | None) -> bool:
    """Extend an expired lease whose attempt is not late: its command still waits in the
    service's queue, it started less than a timeout ago, or it answered and the answer still
    waits in the orchestrator's queue. A command or answer the broker lost is sent again (the
    same attempt: the barrier replays or waits for it) when nothing is queued ahead of it. Past
    SAGA_QUEUE_WAIT_LIMIT from the sending, the attempt counts as timed out after all."""
    if step.sent_at is None:
        return False  # never sent (the caller asks only for a sent attempt)
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
        send(run, step, spec, op, attempt=attempt)
    return True


def apply_action_reply(run: Run, step: SagaStep, reply: JSON) -> bool:
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
        lease(run, step, spec, delay=delay)
        run.record(
            "retry_scheduled",
            step=step,
            from_state=before,
            data={**data, "error": error, "delay": round(delay, 3), "next_attempt": step.attempts},
        )
        send(run, step, spec, ACTION, attempt=step.attempts, delay=delay)
        return True

    # Out of attempts (or the saga is already unwinding). The last attempt may still have
    # committed somewhere, so the step is compensated like a success: the barrier makes that a
    # no-op if it never ran, and refuses the action should it arrive later.
    abandon(run, step, error, reason="abandoned" if unwinding else "retries_exhausted")
    return True


def abandon(run: Run, step: SagaStep, error: JSON, *, reason: str) -> None:
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
class Settling:
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


COMPENSATION = Settling(
    State.COMPENSATING, "compensation_attempts", "compensation_retry", COMPENSATE,
    "finish_compensation", "schedule_compensation_retry", "give_up_compensation",
    "step_compensated", "compensation_retry_scheduled", "compensation_failed",
)  # fmt: skip
CONFIRMATION = Settling(
    State.CONFIRMING, "confirm_attempts", "confirm_retry", CONFIRM,
    "finish_confirm", "schedule_confirm_retry", "give_up_confirm",
    "step_confirmed", "confirm_retry_scheduled", "confirm_failed",
)  # fmt: skip


def apply_compensation_reply(run: Run, step: SagaStep, reply: JSON) -> bool:
    return apply_settling_reply(run, step, reply, COMPENSATION)


def apply_confirm_reply(run: Run, step: SagaStep, reply: JSON) -> bool:
    return apply_settling_reply(run, step, reply, CONFIRMATION)


def apply_settling_reply(run: Run, step: SagaStep, reply: JSON, phase: Settling) -> bool:
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
        lease(run, step, spec, delay=delay)
        run.record(
            phase.retrying, step=step, from_state=phase.state, data={**data, "error": error, "delay": round(delay, 3)}
        )
        send(run, step, spec, phase.op, attempt=getattr(step, phase.attempts), delay=delay)
        return True
    getattr(step, phase.give_up)(error=error)
    step.deadline_at = None
    run.record(phase.failed, step=step, from_state=phase.state, data={**data, "error": error})
    return True
