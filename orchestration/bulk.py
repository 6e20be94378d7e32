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

from django.db.models import Prefetch

from sagaplatform.api import ApiError
from sagaplatform.kernel import ports
from sagaplatform.kernel.clock import db_now

from . import engine, rules
from .exceptions import OperationNotAllowed
from .models import Saga, SagaStep

DB = "default"
ACTIONS = ("retry", "cancel", "skip")
# At most this many sagas in one request: the dashboard sends a large selection in chunks and
# shows the progress between them.
MAX_IDS = 500
# At most this many sagas matched by a filter in one preview.
MAX_MATCHED = 5000


def eligibility(saga: Saga, action: str, *, now, step: str | None = None) -> rules.Verdict:
    """Whether the engine would accept `action` on this saga now, and if not why: the rules
    module's verdict, the one the engine gives (it decides again under the row lock when the
    action is applied)."""
    steps = list(saga.steps.all())
    if action == "cancel":
        return rules.cancel_verdict(saga, steps, now=now)
    if action == "retry":
        return rules.retry_verdict(saga, steps)
    return rules.skip_verdict(saga, steps, step)


def load(ids) -> dict[str, Saga]:
    sagas = Saga.objects.using(DB).filter(id__in=list(ids))
    sagas = sagas.prefetch_related(Prefetch("steps", queryset=SagaStep.objects.using(DB).all()))
    return {str(s.id): s for s in sagas}


def preview(ids: list[str], action: str, *, step: str | None = None) -> dict:
    sagas = load(ids)
    now = db_now(DB)
    eligible, ineligible = [], []
    for saga_id in ids:
        saga = sagas.get(saga_id)
        if saga is None:
            ineligible.append({"id": saga_id, "code": "not_found", "message": "No such saga."})
            continue
        verdict = eligibility(saga, action, now=now, step=step)
        if verdict.allowed:
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
        reason = reason.strip() or "Cancelled by an operator"  # as the dashboard's single cancel
        ports.saga_cancel(saga_id=saga.id, context=saga.context, actor=actor, reason=reason)
        return "Cancellation started."
    if action == "retry":
        engine.saga_retry(saga_id=saga.id, actor=actor, reason=reason)
        return "Retrying."
    if not reason.strip():
        raise OperationNotAllowed("reason_required", "Skipping a compensation needs a reason", status=400)
    verdict = rules.skip_verdict(saga, SagaStep.objects.using(DB).filter(saga=saga), step)
    verdict.check()  # the engine's refusal, in its words (the saga may have changed meanwhile)
    names = list(verdict.steps)
    for name in names:
        engine.saga_skip(saga_id=saga.id, step_name=name, actor=actor, reason=reason)
    return f"Skipped the compensation of {', '.join(names)}."
