"""The live feed, the orchestrator's side: what a saga looks like on the wire (docs/LIVE_FEED.md)
and the hook that publishes every engine transaction once it commits (`publish`).

The plumbing (batching, the channel layer, the consumers' coalescing and healing) is in
sagaplatform/kernel/feed.py.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from datetime import datetime

from django.conf import settings
from django.db import transaction

from sagaplatform.kernel import feed

from .definitions import SagaDefinition, get_definition
from .engine import style
from .models import Saga, SagaEvent, SagaStep

logger = logging.getLogger(__name__)

DB = "default"

STEP_IN_FLIGHT = {
    SagaStep.State.RUNNING,
    SagaStep.State.RETRYING,
    SagaStep.State.COMPENSATING,
    SagaStep.State.CONFIRMING,
}
STEP_DONE = {SagaStep.State.SUCCEEDED, SagaStep.State.CONFIRMED}


def _iso(value: datetime | None) -> str | None:
    return value.isoformat() if value else None


# --- Views (the shapes in docs/LIVE_FEED.md) ---------------------------------------------------


def step_view(step: SagaStep) -> dict:
    return {
        "name": step.name,
        "kind": step.kind,
        "service": step.service,
        "position": step.position,
        "state": step.state,
        "attempts": step.attempts,
        "compensation_attempts": step.compensation_attempts,
        "confirm_attempts": step.confirm_attempts,
        "next_attempt_at": _iso(step.next_attempt_at),
        "deadline_at": _iso(step.deadline_at),
        "started_at": _iso(step.started_at),
        "finished_at": _iso(step.finished_at),
        "error": step.error,
        "acted": step.result is not None,  # as in selectors.step_view
    }


def event_view(event: SagaEvent) -> dict:
    return {
        "seq": event.seq,
        "step": event.step,
        "kind": event.kind,
        "from_state": event.from_state,
        "to_state": event.to_state,
        "data": event.data,
        "actor": event.actor,
        "created_at": _iso(event.created_at),
    }


def saga_header(saga: Saga, steps: Iterable[SagaStep], *, now: datetime) -> dict:
    definition = get_definition(saga.definition)
    steps = list(steps)
    actions = [s for s in steps if s.kind == SagaStep.Kind.ACTION]
    active = sorted((s for s in actions if s.state in STEP_IN_FLIGHT), key=lambda s: s.position)
    lease_passed = any(s.deadline_at is not None and s.deadline_at < now and s.state in STEP_IN_FLIGHT for s in steps)
    failure = saga.failure
    return {
        "id": str(saga.id),
        "order_id": saga.context.get("order_id"),
        "definition": saga.definition,
        "style": style_of(definition),
        "state": saga.state,
        "version": saga.version,
        "created_at": _iso(saga.created_at),
        "updated_at": _iso(saga.updated_at),
        "finished_at": _iso(saga.finished_at),
        "failure": {"code": failure.get("code"), "message": failure.get("message")} if failure else None,
        "active_step": active[0].name if active else None,
        "steps_done": sum(1 for s in actions if s.state in STEP_DONE),
        "steps_total": len(actions),
        "stuck": saga.state == Saga.State.PARKED or (not saga.is_terminal and lease_passed),
        # A step waiting out a backoff before its next attempt (action, compensation or confirm).
        "retrying": any(
            s.state == SagaStep.State.RETRYING
            or (s.state in (SagaStep.State.COMPENSATING, SagaStep.State.CONFIRMING) and s.next_attempt_at is not None)
            for s in steps
        ),
        "cancellable": cancellable(saga, steps, definition),
        "committed_at": None,
    }


def cancellable(saga: Saga, steps: Iterable[SagaStep], definition: SagaDefinition) -> bool:
    """Whether a cancel would be accepted now (the engine decides again under the row lock)."""
    if saga.state != Saga.State.RUNNING:
        return False
    pivots = {s.name for s in definition.steps if s.pivot}
    passing = {SagaStep.State.SUCCEEDED, SagaStep.State.RUNNING, SagaStep.State.RETRYING}
    return not any(s.name in pivots and s.state in passing for s in steps)


def style_of(definition: SagaDefinition) -> str:
    """orchestrated, parallel, tcc or choreography: what the operator filters by (its style says)."""
    return style.of(definition).label(definition)


def definition_graph(definition: SagaDefinition) -> dict:
    def node(spec) -> dict:
        return {
            "name": spec.name,
            "service": spec.service,
            "action": spec.action,
            "after": list(spec.depends_on),
            "pivot": spec.pivot,
            "compensation": spec.compensation,
            "confirm": spec.confirm,
        }

    return {
        "name": definition.name,
        "style": style_of(definition),
        "description": definition.description,
        "steps": [node(s) for s in definition.steps],
        "on_failure": [node(s) for s in definition.on_failure],
    }


def saga_detail(saga: Saga, *, now: datetime, events_after: int = 0, limit: int = 500) -> dict:
    """Header, every step and the events after `events_after`, read from the database."""
    steps = list(SagaStep.objects.using(DB).filter(saga=saga).order_by("kind", "position"))
    events = list(SagaEvent.objects.using(DB).filter(saga=saga, seq__gt=events_after).order_by("-seq")[:limit])
    return {
        "saga": saga_header(saga, steps, now=now),
        "steps": [step_view(s) for s in steps],
        "events": [event_view(e) for e in reversed(events)],
    }


# --- Publishing -------------------------------------------------------------------------------


def publish(run) -> None:
    """Queue the change an engine transaction is writing, to be sent once (if) it commits."""
    if not settings.SAGA_FEED_ENABLED:
        return
    delta = {
        "saga": saga_header(run.saga, run.steps.values(), now=run.now),
        "steps": [step_view(s) for s in run.steps.values()],
        "events": [event_view(e) for e in run.events],
    }
    transaction.on_commit(lambda: feed.publisher.put(delta), using=DB)
