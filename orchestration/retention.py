"""Retention of finished sagas' history: the step-level timeline of sagas that ended more than
SAGA_RETENTION_DAYS ago is deleted, so the biggest table (`SagaEvent`, about 17 rows an order)
does not grow without bound. Off (0, the default): kept forever.

Run by beat (`orchestration.purge_sagas`, every RETENTION_PURGE_INTERVAL) and by `manage.py
purge_sagas`, in batches, within a time budget; a run that stops early is taken up by the next.

What goes and what stays (docs/ARCHITECTURE.md, "Retention"):

- only sagas that have **ended** (completed, compensated, failed, cancelled) at least that long
  ago; a saga running or parked keeps everything, whatever its age;
- deleted: the engine's step-level events (`step != ""`, actor `engine`): commands sent,
  replies, retries, compensations, one per transition;
- kept: the saga, its steps (the audit reads them against the services' records; the barrier
  and outbox retention ask whether the saga ended), its saga-level events (started, completed,
  compensated, parked...) and every event an operator caused (actor not `engine`): the audit
  trail of who did what;
- the outbox rows of an ended saga go with the kernel's purge (`OUTBOX_RETENTION`, a day), its
  barrier rows after `BARRIER_RETENTION` (`sagaplatform/kernel/retention.py`).

Each batch locks its sagas (`SKIP LOCKED`: one an operator is looking at right now waits for the
next run), deletes their events and marks them (`history_purged_at`), in one transaction. The
mark takes a saga out of the partial index `saga_finished_unpurged`, so a run reads only what
is left to do, however long the history is.
"""

from __future__ import annotations

import logging
import time
from datetime import timedelta

from django.conf import settings
from django.db import transaction
from django.db.models.functions import Now

from sagaplatform.kernel.clock import db_now

from .models import Saga, SagaEvent

logger = logging.getLogger(__name__)

DB = "default"
BATCH = 500
# One beat run stops after this long (well inside the task's soft time limit); the next goes on.
RUN_BUDGET_SECONDS = 60.0
ENGINE = "engine"


def retention_age() -> timedelta | None:
    """SAGA_RETENTION_DAYS as an age, or None when the history is kept forever."""
    days = float(getattr(settings, "SAGA_RETENTION_DAYS", 0) or 0)
    return timedelta(days=days) if days > 0 else None


def purge_sagas(
    *, older_than: timedelta, batch: int = BATCH, max_batches: int | None = None, until: float | None = None
) -> dict:
    """Delete the step-level engine events of sagas that ended before `older_than` ago, `batch`
    sagas per transaction, at most `max_batches` batches or until `until` (monotonic)."""
    if older_than <= timedelta(0):
        raise ValueError("the retention age must be positive")
    cutoff = db_now(DB) - older_than
    candidates = (
        Saga.objects.using(DB)
        .filter(finished_at__lt=cutoff, history_purged_at__isnull=True, state__in=Saga.TERMINAL_STATES)
        .order_by("finished_at")
    )
    sagas = events = batches = 0
    while max_batches is None or batches < max_batches:
        if until is not None and time.monotonic() > until:
            break
        page = list(candidates.values_list("id", flat=True)[:batch])
        if not page:
            break
        with transaction.atomic(using=DB):
            locked = list(
                Saga.objects.using(DB)
                .select_for_update(skip_locked=True)
                .filter(id__in=page, history_purged_at__isnull=True, state__in=Saga.TERMINAL_STATES)
                .values_list("id", flat=True)
            )
            if not locked:
                break  # all taken by someone else right now: the next run
            events += SagaEvent.objects.using(DB).filter(saga_id__in=locked, actor=ENGINE).exclude(step="").delete()[0]
            sagas += Saga.objects.using(DB).filter(id__in=locked).update(history_purged_at=Now())
        batches += 1
    result = {"sagas": sagas, "events": events, "batches": batches}
    if sagas:
        logger.info("purged the history of finished sagas: %s", result)
    return result


def purge() -> dict:
    """Apply SAGA_RETENTION_DAYS (nothing when it is off), within one run's time budget."""
    age = retention_age()
    if age is None:
        return {"sagas": 0, "events": 0, "batches": 0, "off": True}
    return purge_sagas(older_than=age, until=time.monotonic() + RUN_BUDGET_SECONDS)
