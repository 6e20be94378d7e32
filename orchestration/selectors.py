from __future__ import annotations

import uuid

from django.db.models import QuerySet
from django.db.models.functions import Now

from . import rules
from .definitions import UnknownDefinitionVersion, for_mode, for_saga
from .models import Saga, SagaStep

DB = "default"


def saga_list() -> QuerySet[Saga]:
    """Every saga, newest first, annotated with what an operator looks for (`rules`):

    - `stuck`: not ended, and parked or with an attempt whose lease has passed (the sweeper
      should have timed it out: a sign that no sweeper or worker is running);
    - `retrying`: not ended, with a step waiting out a backoff before its next attempt.

    Leases are compared with the database clock (`Now()`), as the sweeper does.
    """
    return Saga.objects.using(DB).annotate(**rules.saga_annotations(DB)).order_by("-created_at", "-id")


def saga_get(*, saga_id) -> Saga | None:
    return Saga.objects.using(DB).filter(id=saga_id).first()


def step_view(step: SagaStep) -> dict:
    """A step as the API and the live feed show it (the feed writes the times in ISO 8601)."""
    return {
        "name": step.name,
        "kind": step.kind,
        "service": step.service,
        "position": step.position,
        "state": step.state,
        "attempts": step.attempts,
        "compensation_attempts": step.compensation_attempts,
        "confirm_attempts": step.confirm_attempts,
        "next_attempt_at": step.next_attempt_at,
        "deadline_at": step.deadline_at,
        "started_at": step.started_at,
        "finished_at": step.finished_at,
        "error": step.error,
        # The action took effect (a success was recorded), whatever the step's state since: a
        # compensated step that never acted was a no-op, not an undo.
        "acted": step.result is not None,
    }


def sagas_known(saga_ids: list) -> set[str]:
    """The ids among `saga_ids` that have a saga (through the kernel port)."""
    return {str(i) for i in Saga.objects.using(DB).filter(id__in=saga_ids).values_list("id", flat=True)}


def saga_summary(saga_id) -> dict | None:
    """The saga's state and steps, for read views in other apps (through the kernel port)."""
    saga = Saga.objects.using(DB).filter(id=saga_id).annotate(db_now=Now()).first()
    if saga is None:
        return None
    try:
        definition = for_saga(saga)
    except UnknownDefinitionVersion:
        definition = None  # still shown (steps in their stored order); the saga is parked
    steps = {s.name: s for s in SagaStep.objects.using(DB).filter(saga=saga)}
    if definition is None:
        ordered = sorted(steps.values(), key=lambda s: (s.kind != SagaStep.Kind.ACTION, s.position))
    else:
        ordered = [steps[s.name] for s in (*definition.steps, *definition.on_failure) if s.name in steps]
    return {
        "id": str(saga.id),
        "definition": saga.definition,
        "definition_version": saga.definition_label,
        "definition_hash": saga.definition_hash,
        "state": saga.state,
        "version": saga.version,
        "failure": saga.failure,
        "created_at": saga.created_at,
        "finished_at": saga.finished_at,
        "steps": [step_view(step) for step in ordered],
        "cancellable": rules.cancel_verdict(saga, ordered, now=saga.db_now, definition=definition).allowed,
        "actions": rules.actions_view(rules.allowed_actions(saga, ordered, now=saga.db_now, definition=definition)),
    }


def saga_plan(mode: str) -> list[dict]:
    """The steps a saga for an order of `mode` will have, every one pending (through the kernel
    port `saga_plan`). An order is readable before its saga exists (the start message is on its
    way); it shows these steps then, so a reader never meets a saga without its steps."""
    definition = for_mode(mode)
    return [
        step_view(SagaStep(name=spec.name, kind=kind, position=i, service=spec.service))
        for kind, group in ((SagaStep.Kind.ACTION, definition.steps), (SagaStep.Kind.ON_FAILURE, definition.on_failure))
        for i, spec in enumerate(group)
    ]


def sagas_ended_before(saga_ids, before) -> set[str]:
    """Through the kernel port `sagas_ended_before` (retention). An id that is not a UUID names
    no saga, so it never ended."""
    ids = []
    for saga_id in saga_ids:
        try:
            ids.append(uuid.UUID(str(saga_id)))
        except ValueError:
            continue
    return {
        str(pk)
        for pk in Saga.objects.using(DB)
        .filter(id__in=ids, state__in=Saga.TERMINAL_STATES, finished_at__lt=before)
        .values_list("id", flat=True)
    }
