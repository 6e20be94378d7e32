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
(or a sweeper and a reply) never wait on each other. A saga the engine cannot handle (its
definition is unknown, say) is parked with an alert and left out of later sweeps: one bad saga
never stops the sweep for the others. Parked sagas wait for an operator; their leases are not
swept until one resumes them.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable

from django.db import InterfaceError, OperationalError
from django.db.models import Q
from django.db.models.functions import Now

from sagaplatform.kernel import attempts, outbox

from . import engine, rules
from .definitions import DEFINITIONS
from .models import Saga, SagaStep

CHOREOGRAPHED = [name for name, d in DEFINITIONS.items() if d.style == "choreography"]

logger = logging.getLogger(__name__)

BATCH = 500


def sweep_once() -> dict:
    published = outbox.relay_due(using=engine.DB)
    parked = []
    expired = list(
        SagaStep.objects.using(engine.DB)
        .filter(deadline_at__lte=Now())
        # In flight, or (choreography) scheduled to start and watched for its start.
        .filter(rules.STEP_IN_FLIGHT_Q | Q(state=SagaStep.State.PENDING))
        .exclude(saga__state=Saga.State.PARKED)
        .only("saga_id", "name", "state", "attempts", "compensation_attempts", "confirm_attempts", "sent_at")
        .order_by("deadline_at")[:BATCH]
    )
    marks_of = _attempt_marks(expired)
    idle = _QueueIdle()
    timed_out = _each(
        [(step.saga_id, step) for step in expired],
        lambda row: engine.step_lease_expire(
            saga_id=row[0],
            step_name=row[1].name,
            mark=marks_of.get(row[1].pk) if marks_of else None,
            known=marks_of is not None,
            queue_idle=idle,
        ),
        parked=parked,
    )
    overdue = (
        Saga.objects.using(engine.DB)
        .filter(state=Saga.State.RUNNING, deadline_at__lte=Now())
        .order_by("deadline_at")
        .values_list("id", flat=True)[:BATCH]
    )
    deadlines = _each(overdue, lambda saga_id: engine.saga_deadline_expire(saga_id=saga_id), parked=parked)
    due = (
        SagaStep.objects.using(engine.DB)
        .filter(state=SagaStep.State.PENDING, next_attempt_at__lte=Now(), saga__state=Saga.State.RUNNING)
        .exclude(saga__definition__in=CHOREOGRAPHED)  # their services start their own steps
        .values_list("saga_id", flat=True)
        .distinct()[:BATCH]
    )
    started = _each(due, lambda saga_id: engine.saga_advance(saga_id=saga_id), parked=parked)
    result = {
        "published": published,
        "timed_out": timed_out,
        "deadlines": deadlines,
        "started": started,
        "parked": len(parked),
    }
    if any(result.values()):
        logger.info("sweep: %s", result)
    return result


def _each(rows: Iterable, handle: Callable, *, parked: list) -> int:
    """Handle each saga on its own: one that fails is parked with an alert, and the sweep goes on."""
    done = 0
    for row in rows:
        saga_id = row[0] if isinstance(row, tuple) else row
        if saga_id in parked:
            continue
        try:
            done += bool(handle(row))
        except (OperationalError, InterfaceError):
            raise  # the database itself is unwell, not this saga: the next sweep tries again
        except Exception as error:
            logger.exception("sweep: saga %s failed; parking it", saga_id, extra={"saga_id": str(saga_id)})
            parked.append(saga_id)
            engine.saga_park_broken(saga_id=saga_id, error=error)
    return done


def _attempt_marks(steps: list[SagaStep]) -> dict | None:
    """What the workers noted of the attempts whose leases expired (one Redis round trip), by
    step id; None when the marks cannot be read."""
    keys = {
        step.pk: attempts.key(step.saga_id, step.name, *engine.attempt_in_flight(step))
        for step in steps
        if rules.step_in_flight(step) and step.sent_at
    }
    if not keys:
        return {}
    marks = attempts.read(list(keys.values()))
    if marks is None:
        return None
    return {pk: marks[key] for pk, key in keys.items() if key in marks}


class _QueueIdle:
    """Whether nothing waits in a queue, asked of the broker at most once per sweep. Unknown
    (broker unreachable) counts as idle: sending again is what recovers a lost message."""

    def __init__(self) -> None:
        self.depths: dict | None = None

    def __call__(self, queue: str) -> bool:
        if self.depths is None:
            self.depths = queue_depths()
        return not self.depths.get(queue)


def queue_depths() -> dict:
    from sagaplatform import workers

    return workers.queue_depths()
