"""Bulk operator actions: retry, cancel or skip many sagas with one reason.

`preview` says, without changing anything, which sagas the action would apply to and why the
others are not eligible. `apply` then acts on each saga through the engine's own operator
functions, one saga per transaction under its row lock, and reports each saga's outcome: the
engine decides again under the lock, so a saga that changed since the preview (another
operator's bulk retry got there first) is reported refused with the engine's reason, and
nothing is applied twice. Each saga's timeline records the action with who and why, as a single
action does.
"""

from __future__ import annotations

from dataclasses import dataclass

from django.db.models import Prefetch

from sagaplatform.api import ApiError
from sagaplatform.kernel import ports

from . import engine
from .definitions import get_definition
from .exceptions import OperationNotAllowed
from .models import Saga, SagaStep

DB = "default"
ACTIONS = ("retry", "cancel", "skip")
# At most this many sagas in one request: the dashboard sends a large selection in chunks and
# shows the progress between them.
MAX_IDS = 500
# At most this many sagas matched by a filter in one preview.
MAX_MATCHED = 5000

IN_FLIGHT = (SagaStep.State.RUNNING, SagaStep.State.RETRYING)


@dataclass(frozen=True)
class Verdict:
    ok: bool
    code: str = "eligible"
    message: str = ""


def _steps_of(saga: Saga) -> list[SagaStep]:
    return list(saga.steps.all())


def eligibility(saga: Saga, action: str, *, step: str | None = None) -> Verdict:
    """Whether the engine would accept `action` on this saga now, and if not why: the same
    codes and checks as engine.saga_cancel / saga_retry / saga_skip. (The engine decides again
    under the row lock when the action is applied.)"""
    steps = _steps_of(saga)
    definition = get_definition(saga.definition)
    if action == "cancel":
        if saga.state == Saga.State.CANCELLED or (saga.failure or {}).get("code") == "cancelled":
            return Verdict(False, "already_cancelled", "This order is already cancelled")
        if saga.state != Saga.State.RUNNING:
            return Verdict(False, "not_cancellable", f"This order can no longer be cancelled (it is {saga.state})")
        pivots = {s.name for s in definition.steps if s.pivot}
        for s in steps:
            if s.name in pivots and s.state == SagaStep.State.SUCCEEDED:
                return Verdict(False, "already_shipped", "The order has shipped; it can no longer be cancelled")
            if s.name in pivots and s.state in IN_FLIGHT:
                return Verdict(False, "shipment_in_progress", "The parcel is leaving the warehouse right now")
        return Verdict(True)
    if action == "retry":
        if saga.state == Saga.State.PARKED:
            return Verdict(True)
        if saga.state in (Saga.State.RUNNING, Saga.State.COMPENSATING, Saga.State.CONFIRMING):
            waiting = [
                s
                for s in steps
                if s.kind == SagaStep.Kind.ACTION
                and (
                    s.state == SagaStep.State.RETRYING
                    or (s.state in (SagaStep.State.COMPENSATING, SagaStep.State.CONFIRMING) and s.next_attempt_at)
                )
            ]
            if waiting:
                return Verdict(True)
            return Verdict(False, "saga_not_stuck", f"Saga is {saga.state} with no step waiting to retry")
        return Verdict(False, "saga_not_retryable", f"A {saga.state} saga cannot be retried")
    # skip
    given_up = _given_up(saga, steps, step)
    if saga.state != Saga.State.PARKED or not given_up:
        what = f"Step {step!r} is not" if step else "No step is"
        return Verdict(False, "nothing_to_skip", f"{what} a parked compensation of this saga")
    return Verdict(True)


def _given_up(saga: Saga, steps: list[SagaStep], step: str | None) -> list[str]:
    names = [s.name for s in sorted(steps, key=lambda s: -s.position) if s.state == SagaStep.State.COMPENSATION_FAILED]
    return [n for n in names if n == step] if step else names


def load(ids) -> dict[str, Saga]:
    sagas = Saga.objects.using(DB).filter(id__in=list(ids))
    sagas = sagas.prefetch_related(Prefetch("steps", queryset=SagaStep.objects.using(DB).all()))
    return {str(s.id): s for s in sagas}


def preview(ids: list[str], action: str, *, step: str | None = None) -> dict:
    sagas = load(ids)
    eligible, ineligible = [], []
    for saga_id in ids:
        saga = sagas.get(saga_id)
        if saga is None:
            ineligible.append({"id": saga_id, "code": "not_found", "message": "No such saga."})
            continue
        verdict = eligibility(saga, action, step=step)
        if verdict.ok:
            eligible.append(saga_id)
        else:
            ineligible.append({"id": saga_id, "code": verdict.code, "message": verdict.message, "state": saga.state})
    return {"eligible": eligible, "ineligible": ineligible}


def apply(ids: list[str], action: str, *, actor: str, reason: str, step: str | None = None) -> list[dict]:
    """Act on each saga in turn; one saga's refusal does not stop the others."""
    results = []
    for saga_id in ids:
        try:
            message = _apply_one(saga_id, action, actor=actor, reason=reason, step=step)
        except ApiError as exc:
            results.append({"id": saga_id, "ok": False, "code": exc.code, "message": exc.message})
            continue
        state = Saga.objects.using(DB).filter(id=saga_id).values_list("state", flat=True).first()
        results.append({"id": saga_id, "ok": True, "code": "accepted", "message": message, "state": state})
    return results


def _apply_one(saga_id: str, action: str, *, actor: str, reason: str, step: str | None) -> str:
    saga = Saga.objects.using(DB).filter(id=saga_id).first()
    if saga is None:
        raise OperationNotAllowed("not_found", "No such saga.", status=404)
    if action == "cancel":
        ports.saga_cancel(saga_id=saga.id, context=saga.context, actor=actor, reason=reason)
        return "Cancellation started."
    if action == "retry":
        engine.saga_retry(saga_id=saga.id, actor=actor, reason=reason)
        return "Retrying."
    names = _given_up(saga, list(SagaStep.objects.using(DB).filter(saga=saga)), step)
    if not names:
        # Let the engine refuse it in its own words (the saga may have changed meanwhile).
        names = [step or ""]
    for name in names:
        engine.saga_skip(saga_id=saga.id, step_name=name, actor=actor, reason=reason)
    return f"Skipped the compensation of {', '.join(names)}."
