"""What the coordinated styles (orchestrated, TCC) share: start the steps that are ready, decide
what needs undoing, and unwind a saga in reverse dependency order, then run its failure steps.
"""

from __future__ import annotations

from datetime import timedelta

from sagaplatform.kernel.commands import ACTION, COMPENSATE

from ..definitions import StepSpec
from ..models import Saga, SagaStep
from . import deferral
from .replies import abandon
from .run import CANCELLED, DONE, Run, State, lease, park, send


def needs_compensation(spec: StepSpec, step: SagaStep) -> bool:
    if not spec.compensation:
        return False
    if step.state == State.SUCCEEDED:
        return True
    return step.state == State.FAILED and not (step.error or {}).get("definitive")


def settled(spec: StepSpec, step: SagaStep) -> bool:
    """Nothing of this step is in flight or left to undo."""
    if step.state in (State.PENDING, State.COMPENSATED, State.SKIPPED):
        return True
    if step.state in (State.SUCCEEDED, State.FAILED):
        return not needs_compensation(spec, step)
    return False


def start_ready(run: Run, steps: list[tuple[StepSpec, SagaStep]]) -> None:
    due: list[tuple[StepSpec, SagaStep]] = []
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
            due.append((spec, step))
    # Steps whose service's circuit breaker refuses calls (or that has no live instance) wait and
    # attempt nothing; the breakers of all the others are asked in one round trip.
    waiting = deferral.defer_starts(run, due) if run.saga.state == Saga.State.RUNNING else set()
    for spec, step in due:
        if step.name in waiting:
            continue
        step.dispatch()
        step.started_at = run.now
        lease(run, step, spec)
        run.record("step_started", step=step, from_state=State.PENDING, data={"attempt": 1})
        send(run, step, spec, ACTION, attempt=1)


def advance_compensation(run: Run) -> None:
    saga = run.saga
    # A forward step waiting for its next attempt will not get it: give it up now, so that it
    # is compensated (a no-op if its retry never ran, and the barrier refuses the retry later).
    for _, step in run.action_steps():
        if step.state == State.RETRYING:
            abandon(run, step, step.error or {}, reason="abandoned")
    # Reverse dependency order: a step is undone only once everything that depended on it is.
    for spec, step in reversed(run.action_steps()):
        if not needs_compensation(spec, step):
            continue
        if all(settled(dep, run.steps[dep.name]) for dep in run.definition.dependents(spec.name)):
            before = step.state
            step.begin_compensation()
            lease(run, step, spec)
            run.record("compensation_started", step=step, from_state=before, data={"attempt": 1})
            send(run, step, spec, COMPENSATE, attempt=1)

    given_up = [step.name for _, step in run.action_steps() if step.state == State.COMPENSATION_FAILED]
    if given_up:
        park(run, f"Compensation of {', '.join(given_up)} keeps failing; retry it or skip it with a reason")
        return
    if not all(settled(spec, step) for spec, step in run.action_steps()):
        return

    # Everything undone: run the failure steps (they tell whoever waits why).
    finalizers = run.failure_steps()
    start_ready(run, finalizers)
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


def retry_now(run: Run, spec: StepSpec, step: SagaStep) -> None:
    before = step.state
    step.retry_now()
    step.finished_at = None
    lease(run, step, spec)
    run.record("step_started", step=step, from_state=before, data={"attempt": step.attempts, "by": "operator"})
    send(run, step, spec, ACTION, attempt=step.attempts)
