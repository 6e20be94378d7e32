from __future__ import annotations

from django.db.models import QuerySet

from .definitions import get_definition
from .models import Saga, SagaStep

DB = "default"


def saga_list() -> QuerySet[Saga]:
    return Saga.objects.using(DB).all()


def saga_get(*, saga_id) -> Saga | None:
    return Saga.objects.using(DB).filter(id=saga_id).first()


def step_view(step: SagaStep) -> dict:
    return {
        "name": step.name,
        "kind": step.kind,
        "service": step.service,
        "state": step.state,
        "attempts": step.attempts,
        "compensation_attempts": step.compensation_attempts,
        "confirm_attempts": step.confirm_attempts,
        "next_attempt_at": step.next_attempt_at,
        "started_at": step.started_at,
        "finished_at": step.finished_at,
        "error": step.error,
    }


def saga_summary(saga_id) -> dict | None:
    """The saga's state and steps, for read views in other apps (through the kernel port)."""
    saga = Saga.objects.using(DB).filter(id=saga_id).first()
    if saga is None:
        return None
    definition = get_definition(saga.definition)
    steps = {s.name: s for s in SagaStep.objects.using(DB).filter(saga=saga)}
    ordered = [steps[s.name] for s in (*definition.steps, *definition.on_failure) if s.name in steps]
    return {
        "id": str(saga.id),
        "definition": saga.definition,
        "state": saga.state,
        "failure": saga.failure,
        "created_at": saga.created_at,
        "finished_at": saga.finished_at,
        "steps": [step_view(step) for step in ordered],
    }
