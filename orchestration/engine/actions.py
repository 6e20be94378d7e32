"""What a person may do to a saga: cancel it (through the cancel port), retry it or
skip a parked compensation (an operator). Each is decided under the saga's row lock, so two
people clicking at once, or a click racing a reply, see a consistent state. What is refused, and
the words of the refusal, come from the saga's definition; how the style carries it out, from
the style."""

from __future__ import annotations

from ..definitions import for_context
from ..exceptions import OperationNotAllowed
from ..models import Saga
from . import style
from .run import CANCELLED, DB, Run, State, locked, resolve_alerts


def refuse(run: Run, key: str, **details) -> OperationNotAllowed:
    code, message = run.definition.refusal(key, **details)
    return OperationNotAllowed(code, message, details=details or None)


def saga_cancel(*, saga_id, context: dict, actor: str, reason: str = "") -> Saga:
    """Cancel a saga: stop starting steps, let steps in flight finish (or time out), and
    compensate what succeeded. Refused (409) once the point of no return is passed or being
    passed, and for a saga that already ended. `context` is what the caller knows of the saga,
    used only when the cancel arrives before the saga exists."""
    outcome: dict = {}

    def apply(run: Run) -> bool:
        saga = outcome["saga"] = run.saga
        failure = {"code": CANCELLED, "message": reason or run.definition.message("cancelled"), "by": actor}
        if saga.state == Saga.State.CANCELLED or (saga.failure or {}).get("code") == CANCELLED:
            raise refuse(run, "already_cancelled")
        if saga.state != Saga.State.RUNNING:  # (a saga is started in the transaction that creates it)
            raise refuse(run, "not_cancellable", state=saga.state)
        for spec, step in run.action_steps():
            if spec.pivot and step.state == State.SUCCEEDED:
                raise refuse(run, "pivot_passed")
            if spec.pivot and step.state in (State.RUNNING, State.RETRYING):
                raise refuse(run, "pivot_in_progress")
        style.of(run.definition).cancel(run, failure)
        return True

    if locked(saga_id, apply, actor=actor):
        return outcome["saga"]
    # The saga has not started yet (its start message is on its way): its style starts it
    # cancelled, so the late start message finds it and does nothing.
    definition = for_context(context)
    failure = {"code": CANCELLED, "message": reason or definition.message("cancelled"), "by": actor}
    if style.of(definition).start_cancelled(saga_id=saga_id, definition=definition, context=context, failure=failure):
        return Saga.objects.using(DB).get(id=saga_id)
    # The start won the race and the saga now runs: decide on it like any other.
    locked(saga_id, apply, actor=actor)
    return outcome["saga"]


def saga_retry(*, saga_id, actor: str, reason: str = "") -> Saga:
    """Resume a parked or stuck saga from where it stopped. Safe to call twice at once: the
    second caller finds the saga no longer parked (or its steps no longer stuck) and is refused."""
    outcome: dict = {}

    def apply(run: Run) -> bool:
        saga = run.saga
        outcome["saga"] = saga
        if saga.state == Saga.State.PARKED:
            style.of(run.definition).retry_parked(run, reason)
            resolve_alerts(run)
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
            style.of(run.definition).retry_waiting(run, stuck)
            return True
        raise OperationNotAllowed("saga_not_retryable", f"A {saga.state} saga cannot be retried")

    locked(saga_id, apply, actor=actor)
    if "saga" not in outcome:
        raise OperationNotAllowed("not_found", "No such saga.", status=404)
    return outcome["saga"]


def saga_skip(*, saga_id, step_name: str, actor: str, reason: str) -> Saga:
    """Settle a parked compensation by hand (the operator fixed it outside the platform)."""
    if not reason.strip():
        raise OperationNotAllowed("reason_required", "Skipping a compensation needs a reason", status=400)
    outcome: dict = {}

    def apply(run: Run) -> bool:
        outcome["saga"] = run.saga
        step = run.steps.get(step_name)
        if run.saga.state != Saga.State.PARKED or step is None or step.state != State.COMPENSATION_FAILED:
            raise OperationNotAllowed(
                "nothing_to_skip", f"Step {step_name!r} is not a parked compensation of this saga"
            )
        step.skip_compensation()
        run.record("compensation_skipped", step=step, from_state=State.COMPENSATION_FAILED, data={"reason": reason})
        style.of(run.definition).skipped(run, step)
        if not any(s.state == State.COMPENSATION_FAILED for _, s in run.action_steps()):
            run.saga.resume_compensation()
            run.record("saga_resumed", from_state=Saga.State.PARKED, data={"reason": reason})
            resolve_alerts(run)
        return True

    locked(saga_id, apply, actor=actor)
    if "saga" not in outcome:
        raise OperationNotAllowed("not_found", "No such saga.", status=404)
    return outcome["saga"]
