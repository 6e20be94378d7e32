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

from . import rules, selectors
from .definitions import DEFINITIONS, SagaDefinition, UnknownDefinitionVersion, for_saga
from .engine import style
from .models import Saga, SagaEvent, SagaStep

logger = logging.getLogger(__name__)

DB = "default"


def _iso(value: datetime | None) -> str | None:
    return value.isoformat() if value else None


# --- Views (the shapes in docs/LIVE_FEED.md) ---------------------------------------------------


def step_view(step: SagaStep) -> dict:
    """The API's step view (`selectors.step_view`), with its times in ISO 8601."""
    return {
        key: _iso(value) if isinstance(value, datetime) else value for key, value in selectors.step_view(step).items()
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
    try:
        definition = for_saga(saga)
    except UnknownDefinitionVersion:
        definition = None  # shown all the same (the saga is parked with an alert)
    steps = list(steps)
    actions = [s for s in steps if s.kind == SagaStep.Kind.ACTION]
    active = sorted((s for s in actions if rules.step_in_flight(s)), key=lambda s: s.position)
    allowed = rules.allowed_actions(saga, steps, now=now, definition=definition)
    failure = saga.failure
    return {
        "id": str(saga.id),
        "order_id": saga.context.get("order_id"),
        "definition": saga.definition,
        "definition_version": saga.definition_label,
        "definition_hash": saga.definition_hash,
        # The graph of an older version than the code's (the dashboard has the current ones).
        "definition_graph": (
            None
            if definition is None or DEFINITIONS.get(saga.definition) is definition
            else definition_graph(definition)
        ),
        "style": style_of(definition) if definition else "",
        "state": saga.state,
        "version": saga.version,
        "created_at": _iso(saga.created_at),
        "updated_at": _iso(saga.updated_at),
        "finished_at": _iso(saga.finished_at),
        "failure": {"code": failure.get("code"), "message": failure.get("message")} if failure else None,
        "active_step": active[0].name if active else None,
        "steps_done": sum(1 for s in actions if s.state in rules.STEP_DONE),
        "steps_total": len(actions),
        "stuck": rules.saga_stuck(saga, steps, now),
        # A step waiting out a backoff before its next attempt (action, compensation or confirm).
        "retrying": rules.saga_retrying(saga, steps),
        "cancellable": allowed["cancel"].allowed,
        # What an operator may do now, and why not otherwise (the engine's refusal).
        "actions": rules.actions_view(allowed),
        "committed_at": None,
    }


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
        "label": definition.label,
        "digest": definition.digest,
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
