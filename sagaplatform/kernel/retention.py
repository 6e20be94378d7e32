"""Retention: published outbox rows and old barrier rows are deleted once nothing can need them.

Run per database by beat (`kernel.purge`, every RETENTION_PURGE_INTERVAL) and by `manage.py
purge`. What is kept, and why (docs/ARCHITECTURE.md, "Retention"):

- an outbox row until it has been published for OUTBOX_RETENTION, and, if it belongs to a saga,
  until that saga has been at rest (ended) for as long: an unpublished row is the only copy of
  its message, and the anti-entropy tasks republish rows of what is still in flight;
- a saga's barrier rows in a database until the newest of them, and the saga's end, are older
  than BARRIER_RETENTION, and never less than `minimum_barrier_age()`. A barrier row is what
  turns a late duplicate into a replay: once it is gone a late action runs again, and a late
  compensation finds no action and becomes a null compensation. So the age must exceed every
  way a message of an ended saga can still arrive. A saga that has not ended (running, parked
  for an operator) keeps its rows whatever their age, and so does a saga the orchestrator does
  not know (its start message may still come).

A saga's rows in one database go together, so the audit never sees a compensation without its
action. Whether a saga has ended is asked through a port (`ports.sagas_ended_before`), as the
orders API asks for a saga's progress: the kernel imports no app.
"""

from __future__ import annotations

import logging
import time
from datetime import timedelta
from typing import Any

from django.conf import settings
from django.db.models import Max

from . import ports
from .clock import db_now
from .models import Barrier, OutboxMessage

logger = logging.getLogger(__name__)

BATCH = 1000
# One beat run stops after this long and the next one goes on, well inside the task's soft time
# limit (measured here: about 6,600 outbox and 12,000 barrier rows deleted a second).
RUN_BUDGET_SECONDS = 60.0


def minimum_barrier_age() -> timedelta:
    """The latest a message of an ended saga can still reach a service, from its last barrier
    row: a message held by a dead worker comes back after the visibility timeout, and may have
    waited out a countdown (a retry backoff, at most 60 s; the choreography's handling window and
    its reactions' retries) and run up to the hard time limit. One hour on top for the relay, a
    redelivery racing a slow run and clocks. The saga deadline and an operator's retry of a parked
    saga need nothing here: the saga has not ended while they can still send anything."""
    options = getattr(settings, "CELERY_BROKER_TRANSPORT_OPTIONS", {}) or {}
    visibility = float(options.get("visibility_timeout", 3600))
    countdown = max(60.0, float(getattr(settings, "SHIPPING_HANDLING_SECONDS", 0)) + 30.0)
    return timedelta(seconds=visibility + countdown + float(settings.CELERY_TASK_TIME_LIMIT) + 3600)


def barrier_age() -> timedelta:
    configured = timedelta(seconds=settings.BARRIER_RETENTION)
    floor = minimum_barrier_age()
    if configured < floor:
        logger.warning("BARRIER_RETENTION=%ss is below the safe minimum; using %s", settings.BARRIER_RETENTION, floor)
    return max(configured, floor)


def outbox_age() -> timedelta:
    return timedelta(seconds=settings.OUTBOX_RETENTION)


def purge_outbox(*, using: str, older_than: timedelta, batch: int = BATCH, until: float | None = None) -> int:
    """Delete rows published before `older_than` ago whose saga (if any) ended as long ago."""
    cutoff = db_now(using) - older_than
    rows = OutboxMessage.objects.using(using).filter(published_at__lt=cutoff).order_by("id")
    purged, after = 0, None
    while True:
        page = list(
            (rows if after is None else rows.filter(id__gt=after)).values_list("id", "payload__saga_id")[:batch]
        )
        if not page or (until is not None and time.monotonic() > until):
            return purged
        after = page[-1][0]
        ended = ports.sagas_ended_before({saga for _, saga in page if saga}, cutoff)
        doomed = [pk for pk, saga in page if not saga or str(saga) in ended]
        if doomed:
            purged += OutboxMessage.objects.using(using).filter(id__in=doomed).delete()[0]


def purge_barrier(*, using: str, older_than: timedelta, batch: int = BATCH, until: float | None = None) -> int:
    """Delete every barrier row of the sagas whose newest row here, and whose end, are older than
    `older_than`."""
    cutoff = db_now(using) - older_than
    groups = (
        Barrier.objects.using(using)
        .values("saga_id")
        .annotate(newest=Max("created_at"))
        .filter(newest__lt=cutoff)
        .order_by("saga_id")
    )
    purged, after = 0, None
    while True:
        page = [str(g["saga_id"]) for g in (groups if after is None else groups.filter(saga_id__gt=after))[:batch]]
        if not page or (until is not None and time.monotonic() > until):
            return purged
        after = page[-1]
        ended = ports.sagas_ended_before(set(page), cutoff)
        if ended:
            # Whole groups only, checked again in the deleting statement: a saga with a row
            # written since the page was read (a late duplicate) keeps all its rows.
            young = (
                Barrier.objects.using(using).filter(saga_id__in=list(ended), created_at__gte=cutoff).values("saga_id")
            )
            purged += (
                Barrier.objects.using(using).filter(saga_id__in=list(ended)).exclude(saga_id__in=young).delete()[0]
            )


def purge(*, using: str) -> dict[str, Any]:
    """Apply the configured retention to one database."""
    until = time.monotonic() + RUN_BUDGET_SECONDS
    result = {
        "outbox": purge_outbox(using=using, older_than=outbox_age(), until=until),
        "barrier": purge_barrier(using=using, older_than=barrier_age(), until=until),
    }
    if any(result.values()):
        logger.info("purged from %s: %s", using, result)
    return result
