"""The saga engine: start a saga, apply a service's reply, decide what to send next.

Every entry point runs in one transaction on the orchestrator's database with the saga row
locked: it applies the news to the steps, records an event per transition, and writes the next
commands to the outbox, which publishes them after commit. What to do next is decided from the
stored state alone (`_advance`), so a redelivered reply, a restarted worker or a sweep can call
it again and get the same answer.
"""

from __future__ import annotations

import logging
import uuid
from dataclasses import dataclass, field
from datetime import timedelta

from django.db import IntegrityError, transaction
from django.utils import timezone

from sagaplatform.kernel import outbox
from sagaplatform.kernel.commands import ACTION, BUSINESS_FAILURE, COMPENSATE, SUCCEEDED, Command

from .definitions import SagaDefinition, StepSpec, get_definition
from .models import Saga, SagaEvent, SagaStep

logger = logging.getLogger(__name__)

DB = "default"
State = SagaStep.State


@dataclass
class _Run:
    """One engine transaction's working set: the locked saga, its steps, the events to append."""

    saga: Saga
    definition: SagaDefinition
    steps: dict[str, SagaStep]
    actor: str = "engine"
    events: list[SagaEvent] = field(default_factory=list)
    dirty: set[str] = field(default_factory=set)

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

    def action_steps(self) -> list[tuple[StepSpec, SagaStep]]:
        return [(spec, self.steps[spec.name]) for spec in self.definition.steps]

    def failure_steps(self) -> list[tuple[StepSpec, SagaStep]]:
        return [(spec, self.steps[spec.name]) for spec in self.definition.on_failure]


# --- Entry points ------------------------------------------------------------------------------


def saga_start(*, saga_id: uuid.UUID | str, definition: str, context: dict) -> bool:
    """Create and start a saga. Idempotent on `saga_id`: a repeated start message does nothing."""
    try:
        with transaction.atomic(using=DB):
            if Saga.objects.using(DB).filter(id=saga_id).exists():
                return False
            spec = get_definition(definition)
            saga = Saga.objects.using(DB).create(id=saga_id, definition=definition, context=context)
            steps = SagaStep.objects.using(DB).bulk_create(
                [
                    SagaStep(saga=saga, name=s.name, kind=kind, position=i, service=s.service)
                    for kind, group in ((SagaStep.Kind.ACTION, spec.steps), (SagaStep.Kind.ON_FAILURE, spec.on_failure))
                    for i, s in enumerate(group)
                ]
            )
            run = _Run(saga=saga, definition=spec, steps={s.name: s for s in steps})
            run.record("saga_created", data={"definition": definition})
            saga.start()
            run.record("saga_started", from_state=Saga.State.PENDING)
            _advance(run)
            run.flush()
            return True
    except IntegrityError:
        # The same start message, delivered twice at once: the other one created it.
        if Saga.objects.using(DB).filter(id=saga_id).exists():
            return False
        raise


def reply_handle(*, reply: dict) -> None:
    """Apply one service reply to its saga. Stale or duplicate replies change nothing."""
    with transaction.atomic(using=DB):
        saga = Saga.objects.using(DB).select_for_update().filter(id=reply["saga_id"]).first()
        if saga is None:
            logger.warning("reply for unknown saga %s", reply.get("saga_id"))
            return
        run = _Run(saga=saga, definition=get_definition(saga.definition), steps=_steps(saga))
        step = run.steps.get(reply["step"])
        if step is None:
            logger.warning("reply for unknown step %s of saga %s", reply.get("step"), saga.id)
            return
        applied = (_apply_action_reply if reply["op"] == ACTION else _apply_compensation_reply)(run, step, reply)
        if not applied:
            logger.info(
                "stale reply ignored",
                extra={"saga_id": str(saga.id), "step": step.name, "attempt": reply.get("attempt")},
            )
            return
        _advance(run)
        run.flush()


def _steps(saga: Saga) -> dict[str, SagaStep]:
    return {s.name: s for s in SagaStep.objects.using(DB).filter(saga=saga)}


# --- Applying replies -------------------------------------------------------------------------


def _apply_action_reply(run: _Run, step: SagaStep, reply: dict) -> bool:
    if step.state not in (State.RUNNING, State.RETRYING) or reply.get("attempt") != step.attempts:
        return False
    spec = run.definition.step(step.name)
    status = reply["status"]
    before = step.state
    data = {"attempt": step.attempts, "replayed": bool(reply.get("replayed"))}
    now = timezone.now()
    if status == SUCCEEDED:
        step.succeed(result=reply.get("result") or {})
        step.finished_at = now
        run.record("step_succeeded", step=step, from_state=before, data=data)
        return True

    error = reply.get("error") or {"code": "unknown", "message": "no error given"}
    if status == BUSINESS_FAILURE:
        # Definitive: the barrier stored the failure with none of its effects, so there is
        # nothing of this step to compensate.
        step.fail(error={**error, "definitive": True})
        step.finished_at = now
        run.record("step_failed", step=step, from_state=before, data={**data, "error": error})
        return True

    # Once the saga unwinds, a forward step stops retrying; its failure steps keep going.
    unwinding = run.saga.state != Saga.State.RUNNING and step.kind == SagaStep.Kind.ACTION
    if not unwinding and spec.retry.allows_another(step.attempts):
        delay = spec.retry.delay(step.attempts)
        step.schedule_retry(error=error, next_attempt_at=now + timedelta(seconds=delay))
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
    reason = "abandoned" if unwinding else "retries_exhausted"
    step.fail(
        error={
            "code": reason,
            "message": f"{step.name} failed after {step.attempts} attempt(s): {error.get('message', '')}",
            "details": {"last_error": error},
        }
    )
    step.finished_at = now
    run.record("step_failed", step=step, from_state=before, data={**data, "error": error, "reason": reason})
    return True


def _apply_compensation_reply(run: _Run, step: SagaStep, reply: dict) -> bool:
    if step.state != State.COMPENSATING or reply.get("attempt") != step.compensation_attempts:
        return False
    spec = run.definition.step(step.name)
    data = {"attempt": step.compensation_attempts, "replayed": bool(reply.get("replayed"))}
    if reply["status"] == SUCCEEDED:
        step.finish_compensation()
        step.finished_at = timezone.now()
        result = reply.get("result") or {}
        run.record(
            "step_compensated",
            step=step,
            from_state=State.COMPENSATING,
            data={**data, "null_compensation": reply.get("barrier") == "null_compensation", "result": result},
        )
        return True
    # A compensation must eventually succeed: whatever the error, retry it on its own policy.
    error = reply.get("error") or {"code": "unknown", "message": "no error given"}
    if spec.compensation_retry.allows_another(step.compensation_attempts):
        delay = spec.compensation_retry.delay(step.compensation_attempts)
        step.schedule_compensation_retry(error=error, next_attempt_at=timezone.now() + timedelta(seconds=delay))
        run.record(
            "compensation_retry_scheduled",
            step=step,
            from_state=State.COMPENSATING,
            data={**data, "error": error, "delay": round(delay, 3)},
        )
        _send(run, step, spec, COMPENSATE, attempt=step.compensation_attempts, delay=delay)
        return True
    step.give_up_compensation(error=error)
    run.record("compensation_failed", step=step, from_state=State.COMPENSATING, data={**data, "error": error})
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
    if step.state in (State.PENDING, State.COMPENSATED):
        return True
    if step.state in (State.SUCCEEDED, State.FAILED):
        return not _needs_compensation(spec, step)
    return False


def _advance(run: _Run) -> None:
    saga = run.saga
    if saga.state == Saga.State.RUNNING:
        failed = [step for _, step in run.action_steps() if step.state == State.FAILED]
        if failed:
            error = failed[0].error or {}
            saga.begin_compensation(
                failure={"step": failed[0].name, "code": error.get("code"), "message": error.get("message")}
            )
            run.record("saga_compensating", from_state=Saga.State.RUNNING, data={"failure": saga.failure})
        else:
            _dispatch_ready(run, run.action_steps())
            if all(step.state == State.SUCCEEDED for _, step in run.action_steps()):
                saga.complete()
                saga.finished_at = timezone.now()
                run.record("saga_completed", from_state=Saga.State.RUNNING)
            return
    if saga.state == Saga.State.COMPENSATING:
        _advance_compensation(run)


def _dispatch_ready(run: _Run, steps: list[tuple[StepSpec, SagaStep]]) -> None:
    for spec, step in steps:
        if step.state == State.PENDING and all(run.steps[d].state == State.SUCCEEDED for d in spec.depends_on):
            step.dispatch()
            step.started_at = timezone.now()
            run.record("step_started", step=step, from_state=State.PENDING, data={"attempt": 1})
            _send(run, step, spec, ACTION, attempt=1)


def _advance_compensation(run: _Run) -> None:
    saga = run.saga
    # Reverse dependency order: a step is undone only once everything that depended on it is.
    for spec, step in reversed(run.action_steps()):
        if not _needs_compensation(spec, step):
            continue
        if all(_settled(dep, run.steps[dep.name]) for dep in run.definition.dependents(spec.name)):
            before = step.state
            step.begin_compensation()
            run.record("compensation_started", step=step, from_state=before, data={"attempt": 1})
            _send(run, step, spec, COMPENSATE, attempt=1)

    if any(step.state == State.COMPENSATION_FAILED for _, step in run.action_steps()):
        saga.park()
        run.record("saga_parked", from_state=Saga.State.COMPENSATING)
        return
    if not all(_settled(spec, step) for spec, step in run.action_steps()):
        return

    # Everything undone: tell the order and the customer why.
    finalizers = run.failure_steps()
    _dispatch_ready(run, finalizers)
    gave_up = [step for _, step in finalizers if step.state == State.FAILED]
    if gave_up:
        saga.fail(failure={**(saga.failure or {}), "finalizer": gave_up[0].name})
        saga.finished_at = timezone.now()
        run.record("saga_failed", from_state=Saga.State.COMPENSATING, data={"step": gave_up[0].name})
    elif all(step.state == State.SUCCEEDED for _, step in finalizers):
        saga.finish_compensation()
        saga.finished_at = timezone.now()
        run.record("saga_compensated", from_state=Saga.State.COMPENSATING)


def _send(run: _Run, step: SagaStep, spec: StepSpec, op: str, *, attempt: int, delay: float = 0.0) -> None:
    payload = {key: run.saga.context.get(key) for key in spec.inputs}
    if step.kind == SagaStep.Kind.ON_FAILURE:
        payload["failure"] = run.saga.failure
    command = Command(
        saga_id=run.saga.id,
        step=step.name,
        op=op,
        operation=spec.action if op == ACTION else spec.compensation,
        attempt=attempt,
        payload=payload,
    )
    outbox.enqueue(
        using=DB, task=f"{spec.service}.execute", queue=spec.service, payload=command.to_message(), delay=delay
    )
