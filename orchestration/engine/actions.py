"""What a person may do to a saga: cancel it (through the cancel port), retry it or
skip a parked compensation (an operator). Each is decided under the saga's row lock, so two
people clicking at once, or a click racing a reply, see a consistent state. What is refused, and
the words of the refusal, come from the rules (`orchestration/rules.py`, which the API, the
admin and the live feed ask too) and the saga's definition; how the style carries it out, from
the style."""

from __future__ import annotations

from .. import rules
from ..definitions import for_context
from ..exceptions import OperationNotAllowed
from ..models import Saga, SagaStep
from . import style
from .run import CANCELLED, DB, JSON, Run, SagaId, locked, resolve_alerts


def saga_cancel(*, saga_id: SagaId, context: JSON, actor: str, reason: str = "") -> Saga:
    """Cancel a saga: stop starting steps, let steps in flight finish (or time out), and
    compensate what succeeded. Refused (409) once the point of no return is passed or being
    passed, and for a saga that already ended. `context` is what the caller knows of the saga,
    used only when the cancel arrives before the saga exists."""
    outcome: dict[str, Saga] = {}

    def apply(run: Run) -> bool:
        saga = outcome["saga"] = run.saga
        failure = {"code": CANCELLED, "message": reason or run.definition.message("cancelled"), "by": actor}
        # (A saga is started in the transaction that creates it: one not running has ended, or waits.)
        rules.cancel_verdict(saga, run.steps.values(), now=run.now, definition=run.definition).check()
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


def saga_retry(*, saga_id: SagaId, actor: str, reason: str = "") -> Saga:
    """Resume a parked or stuck saga from where it stopped. Safe to call twice at once: the
    second caller finds the saga no longer parked (or its steps no longer stuck) and is refused."""
    outcome: dict[str, Saga] = {}

    def apply(run: Run) -> bool:
        saga = run.saga
        outcome["saga"] = saga
        rules.retry_verdict(saga, run.steps.values(), definition=run.definition).check()
        if saga.state == Saga.State.PARKED:
            style.of(run.definition).retry_parked(run, reason)
            resolve_alerts(run)
            return True
        # Steps waiting out a backoff get their next attempt now. (An attempt in flight is left
        # alone: its lease decides.) Once retried a step waits for nothing, so a second operator
        # clicking at the same moment finds nothing to retry.
        stuck = [(spec, s) for spec, s in run.action_steps() if rules.step_backing_off(s)]
        run.record("operator_retry", data={"reason": reason, "steps": [s.name for _, s in stuck]})
        style.of(run.definition).retry_waiting(run, stuck)
        return True

    locked(saga_id, apply, actor=actor)
    if "saga" not in outcome:
        raise OperationNotAllowed("not_found", "No such saga.", status=404)
    return outcome["saga"]


def saga_skip(*, saga_id: SagaId, step_name: str, actor: str, reason: str) -> Saga:
    """Settle a parked compensation by hand (the operator fixed it outside the platform)."""
    if not reason.strip():
        raise OperationNotAllowed("reason_required", "Skipping a compensation needs a reason", status=400)
    outcome: dict[str, Saga] = {}

    def apply(run: Run) -> bool:
        outcome["saga"] = run.saga
        rules.skip_verdict(run.saga, run.steps.values(), step_name, definition=run.definition).check()
        step = run.steps[step_name]
        step.skip_compensation()
        run.record(
            "compensation_skipped", step=step, from_state=SagaStep.State.COMPENSATION_FAILED, data={"reason": reason}
        )
        style.of(run.definition).skipped(run, step)
        if not any(s.state == SagaStep.State.COMPENSATION_FAILED for _, s in run.action_steps()):
            run.saga.resume_compensation()
            run.record("saga_resumed", from_state=Saga.State.PARKED, data={"reason": reason})
            resolve_alerts(run)
        return True

    locked(saga_id, apply, actor=actor)
    if "saga" not in outcome:
        raise OperationNotAllowed("not_found", "No such saga.", status=404)
    return outcome["saga"]
