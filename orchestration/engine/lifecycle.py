"""A saga's life outside the replies: its start, the sweeper's verdicts (an expired lease, a
passed deadline, a step whose start time came) and parking a saga the engine fails on."""

from __future__ import annotations

import logging
import uuid
from datetime import datetime

from django.db import IntegrityError, connections, transaction
from django.db.models.functions import Now

from sagaplatform.kernel import attempts
from sagaplatform.kernel.clock import db_now
from sagaplatform.observability import tracing

from ..definitions import get_definition
from ..models import Alert, Saga, SagaEvent
from . import style
from .run import DB, JSON, QueueIdle, Run, SagaId, State, create_saga, flush_many, locked

logger = logging.getLogger(__name__)


def saga_start(*, saga_id: SagaId, definition: str, context: JSON, cancel: JSON | None = None) -> bool:
    """Create and start a saga. Idempotent on `saga_id`: a repeated start message does nothing.

    With `cancel`, the saga is created already cancelled (a cancel that overtook the start)."""
    try:
        with transaction.atomic(using=DB):
            exists, now = _existing([str(uuid.UUID(str(saga_id)))])
            if exists:
                return False
            spec = get_definition(definition)
            # Written once, as it stands after its first steps start, with its first commands.
            run = create_saga(saga_id=saga_id, definition=spec, context=context, now=now, deferred=True)
            run.outbox = []  # its first commands are written with it (`flush_many`)
            saga = run.saga
            run.record("saga_created", data={"definition": definition})
            saga.start()
            run.record("saga_started", from_state=Saga.State.PENDING)
            if cancel:
                saga.begin_compensation(failure=cancel)
                run.record("saga_cancel_requested", from_state=Saga.State.RUNNING, data={"reason": cancel["message"]})
            style.of(spec).advance(run)
            run.flush()
            return True
    except IntegrityError:
        # The same start message, delivered twice at once: the other one created it.
        if Saga.objects.using(DB).filter(id=saga_id).exists():
            return False
        raise


def saga_start_many(*, starts: list[tuple[SagaId, str, JSON]], contexts: list[JSON | None]) -> list[bool | None]:
    """Create and start a batch of sagas (`saga_id`, definition name, context) in one
    transaction: their writes and their first commands in one statement on PostgreSQL
    (`run.flush_many`). Idempotent as `saga_start`: a saga that exists, or a second start of one in the
    batch, does nothing. If anything raises (a concurrent duplicate start, an unknown
    definition), the transaction rolls back and each starts alone (`saga_start`). For each: True
    if it created the saga, False if it existed, None if it failed (alone)."""
    if len(starts) > 1:
        try:
            with transaction.atomic(using=DB):
                return _start_together(starts, contexts)
        except Exception:
            logger.warning("a batch of %d starts failed; starting each alone", len(starts), exc_info=True)
    results: list[bool | None] = []
    for (saga_id, definition, context), trace_context in zip(starts, contexts, strict=True):
        try:
            with tracing.restored(trace_context):
                results.append(saga_start(saga_id=saga_id, definition=definition, context=context))
        except Exception:
            logger.warning("saga %s: its start failed", saga_id, exc_info=True, extra={"saga_id": str(saga_id)})
            results.append(None)
    return results


def _existing(ids: list[str]) -> tuple[set[str], datetime]:
    """Which of these sagas exist, and the database clock: one round trip on PostgreSQL."""
    connection = connections[DB]
    if connection.vendor != "postgresql":
        return {str(i) for i in Saga.objects.using(DB).filter(id__in=ids).values_list("id", flat=True)}, db_now(DB)
    table = connection.ops.quote_name(Saga._meta.db_table)
    with connection.cursor() as cursor:
        cursor.execute(
            f"SELECT clock_timestamp(), ARRAY(SELECT id::text FROM {table} WHERE id = ANY(%s::uuid[]))",  # noqa: S608
            [ids],
        )
        now, found = cursor.fetchone()
    return set(found), now


def _start_together(starts: list[tuple[SagaId, str, JSON]], contexts: list[JSON | None]) -> list[bool | None]:
    ids = [str(uuid.UUID(str(saga_id))) for saga_id, _, _ in starts]
    exists, now = _existing(ids)
    runs: list[Run] = []
    results: list[bool | None] = []
    for key, (_, definition, context), trace_context in zip(ids, starts, contexts, strict=True):
        if key in exists:
            results.append(False)
            continue
        exists.add(key)
        with tracing.restored(trace_context):  # its first commands join the order's trace
            spec = get_definition(definition)
            run = create_saga(saga_id=key, definition=spec, context=context, now=now, deferred=True)
            run.outbox = []
            run.record("saga_created", data={"definition": definition})
            run.saga.start()
            run.record("saga_started", from_state=Saga.State.PENDING)
            style.of(spec).advance(run)
        runs.append(run)
        results.append(True)
    flush_many(runs)
    return results


def step_lease_expire(
    *,
    saga_id: SagaId,
    step_name: str,
    mark: attempts.Mark | None = None,
    known: bool = False,
    queue_idle: QueueIdle | None = None,
) -> bool:
    """The sweeper found a step whose lease passed: its style decides (time the attempt out,
    extend the lease, or ask again for an event)."""

    def apply(run: Run) -> bool:
        step = run.steps.get(step_name)
        if step is None or not step.deadline_at or step.deadline_at > run.now:
            return False  # it moved on since the sweeper looked
        return style.of(run.definition).lease_expired(run, step, mark=mark, known=known, queue_idle=queue_idle)

    return locked(saga_id, apply, skip_locked=True)


def saga_deadline_expire(*, saga_id: SagaId) -> bool:
    """Past its global deadline: compensate before the pivot; after it, only go forward."""

    def apply(run: Run) -> bool:
        saga = run.saga
        if saga.state != Saga.State.RUNNING or not saga.deadline_at or saga.deadline_at > run.now:
            return False
        saga.deadline_at = None
        if run.past_pivot():
            run.record("deadline_passed_after_pivot", data={"policy": "forward"})
            return True
        saga.begin_compensation(
            failure={"code": "deadline_exceeded", "message": run.definition.message("deadline_exceeded")}
        )
        run.record("saga_compensating", from_state=Saga.State.RUNNING, data={"failure": saga.failure})
        # Nothing more is worth waiting for: expire the leases of attempts still in flight,
        # with no allowance for a queue.
        for _, step in run.action_steps():
            if step.state in (State.RUNNING, State.RETRYING):
                step.deadline_at, step.sent_at = run.now, None
                run.dirty.add(step.name)
        return True

    return locked(saga_id, apply, skip_locked=True)


def saga_advance(*, saga_id: SagaId) -> bool:
    """Re-decide from the stored state (the sweeper, for steps whose start time has come)."""
    return locked(saga_id, lambda run: True, skip_locked=True)


def saga_park_broken(*, saga_id: SagaId, error: Exception) -> bool:
    """Park a saga the engine failed on (an unknown definition, a step it no longer has), with
    an alert, so that the sweeper leaves it out instead of failing on it at every run. Written
    without the definition, which may be what is missing."""
    message = f"The engine failed on this saga ({type(error).__name__}: {error}); fix the cause, then retry it"
    with transaction.atomic(using=DB):
        rows = Saga.objects.using(DB).select_for_update(skip_locked=True).filter(id=saga_id)
        saga = rows.annotate(db_now=Now()).first()
        if saga is None or saga.state not in (Saga.State.RUNNING, Saga.State.CONFIRMING, Saga.State.COMPENSATING):
            return False
        before = saga.state
        saga.park()
        saga.deadline_at = None
        saga.version += 1
        saga.save(using=DB)
        SagaEvent.objects.using(DB).create(
            saga=saga,
            seq=saga.version,
            kind="saga_parked",
            from_state=before,
            to_state=saga.state,
            data={"message": message, "error": type(error).__name__},
            created_at=saga.db_now,
        )
        Alert.objects.using(DB).create(saga=saga, kind=Alert.Kind.SAGA_PARKED, message=message[:500])
    logger.error("saga %s parked: %s", saga_id, message, extra={"saga_id": str(saga_id)})
    return True
