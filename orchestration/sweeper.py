"""The orchestrator's periodic safety net (Celery beat in production, a thread when embedded).

Each sweep:
1. publishes what the orchestrator's outbox still holds (each service relays its own outbox
   from its own periodic task, `kernel.relay_outbox`);
2. times out attempts whose lease expired: a lost command, a lost reply, a dead worker and a
   hung step all end here, as a transient failure of that attempt (retry, or compensate);
3. applies the global deadline of sagas that outlived it;
4. starts steps whose start window has passed (`StepSpec.start_after`).

Every comparison uses the database clock (`Now()`), so workers whose clocks disagree still agree
on what is due. Each saga is handled in its own transaction with `skip_locked`, so two sweepers
(or a sweeper and a reply) never wait on each other.
"""

from __future__ import annotations

import logging

from django.db.models import Q
from django.db.models.functions import Now

from sagaplatform.kernel import outbox

from . import engine
from .definitions import DEFINITIONS
from .models import Saga, SagaStep

CHOREOGRAPHED = [name for name, d in DEFINITIONS.items() if d.style == "choreography"]

logger = logging.getLogger(__name__)

BATCH = 500


def sweep_once() -> dict:
    published = outbox.relay_due(using=engine.DB)
    expired = (
        SagaStep.objects.using(engine.DB)
        .filter(deadline_at__lte=Now())
        # In flight, or (choreography) scheduled to start and watched for its start.
        .filter(Q(state__in=engine.IN_FLIGHT) | Q(state=SagaStep.State.PENDING))
        .order_by("deadline_at")
        .values_list("saga_id", "name")[:BATCH]
    )
    timed_out = sum(engine.step_lease_expire(saga_id=saga_id, step_name=name) for saga_id, name in expired)
    overdue = (
        Saga.objects.using(engine.DB)
        .filter(state=Saga.State.RUNNING, deadline_at__lte=Now())
        .order_by("deadline_at")
        .values_list("id", flat=True)[:BATCH]
    )
    deadlines = sum(engine.saga_deadline_expire(saga_id=saga_id) for saga_id in overdue)
    due = (
        SagaStep.objects.using(engine.DB)
        .filter(state=SagaStep.State.PENDING, next_attempt_at__lte=Now(), saga__state=Saga.State.RUNNING)
        .exclude(saga__definition__in=CHOREOGRAPHED)  # their services start their own steps
        .values_list("saga_id", flat=True)
        .distinct()[:BATCH]
    )
    started = sum(engine.saga_advance(saga_id=saga_id) for saga_id in due)
    result = {"published": published, "timed_out": timed_out, "deadlines": deadlines, "started": started}
    if any(result.values()):
        logger.info("sweep: %s", result)
    return result
