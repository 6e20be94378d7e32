"""Transactional outbox: a message is a row written with the state change that implies it.

`enqueue()` must run inside `transaction.atomic(using=alias)`. After that transaction commits
the message is published straight away (fast path); if the process dies first, or the broker is
down, `relay_due()` (run by the periodic sweeper) publishes it later. A message can therefore be
published more than once, never zero times: consumers are idempotent (barrier, step attempts).

A delayed message (a retry, a handling window) is published by the relay only, once it is due on
the database clock. It never travels as a broker countdown: that is an ETA on the publisher's
clock which the consuming worker waits for on its own, so one worker ten minutes behind held
every retry for ten minutes.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable, Iterator
from datetime import datetime, timedelta
from typing import Any

from celery import current_app
from celery._state import get_current_task
from django.conf import settings
from django.db import connections, transaction
from django.db.models import F, Q
from django.utils import timezone

from sagaplatform.observability import hooks as observability
from sagaplatform.observability import tracing

from . import attempts, faults, rows
from .clock import db_now
from .models import OutboxMessage

logger = logging.getLogger(__name__)

# Give the after-commit fast path this long before the sweep publishes a row itself, so the two
# do not routinely race each other into duplicates.
SWEEP_GRACE = timedelta(seconds=5)
# Publishing is retried once, quickly; past that the sweep takes over, so a broker outage slows
# no request down by more than a moment.
PUBLISH_RETRY_POLICY = {"max_retries": 1, "interval_start": 0, "interval_step": 0.2, "interval_max": 0.2}


def enqueue(
    *,
    using: str,
    task: str,
    queue: str,
    payload: dict[str, Any],
    delay: float = 0.0,
    now: datetime | None = None,
    inline: bool = False,
) -> OutboxMessage:
    """Write a message to `using`'s outbox; it is published once the transaction commits, or,
    when delayed, by the relay once due.

    `now` is the caller's database-clock reading, when it has one. Without it the due time is
    the database's clock too (in the INSERT itself; one extra query for a delayed message), so a
    worker's own clock never decides when a message goes out.

    `inline`: when the transaction commits inside a worker task, and this worker consumes the
    message's queue, run the message's task right here instead of sending it through the broker
    (`run_inline`). A service's reply and the tracker's copy of a choreography event are sent
    this way: one Celery hop less each.
    """
    if not connections[using].in_atomic_block:
        raise RuntimeError(f"outbox.enqueue({task!r}) must run inside transaction.atomic(using={using!r})")
    if now is None and delay > 0:
        now = db_now(using)
    created = message(task=task, queue=queue, payload=payload, delay=delay, now=now)
    _insert(using, [created])
    written(using=using, messages=[created], inline=inline)
    return created


def enqueue_many(*, using: str, messages: list[OutboxMessage], inline: bool = False) -> list[OutboxMessage]:
    """Write many messages (built with `message()`) in one INSERT, in the caller's transaction;
    the undelayed ones are published together once it commits, the delayed ones by the relay
    once due. With `inline`, as `enqueue`'s."""
    if not connections[using].in_atomic_block:
        raise RuntimeError(f"outbox.enqueue_many must run inside transaction.atomic(using={using!r})")
    if not messages:
        return []
    _insert(using, messages)
    written(using=using, messages=messages, inline=inline)
    return messages


def enqueue_along(
    *, using: str, messages: list[OutboxMessage], along: tuple[str, list[Any]], inline: bool = False
) -> int:
    """`enqueue_many` on PostgreSQL, with another data-modifying statement of the caller's run in
    the same round trip (`along`: an INSERT's SQL and parameters, without RETURNING). Returns how
    many rows that statement wrote. `messages` must not be empty."""
    connection = connections[using]
    if not connection.in_atomic_block:
        raise RuntimeError(f"outbox.enqueue_along must run inside transaction.atomic(using={using!r})")
    if connection.vendor != "postgresql" or not messages:
        raise ValueError("outbox.enqueue_along writes at least one message, on PostgreSQL")
    sql, params = rows.insert(OutboxMessage, messages, connection)
    head, head_params = along
    undue = {str(m.id): m for m in messages if not isinstance(m.available_at, datetime)}
    # Both statements are the platform's own templates (every value a parameter).
    statement = (
        f"WITH head AS ({head} RETURNING 1), written AS ({sql} RETURNING id, available_at) "  # noqa: S608
        "SELECT (SELECT count(*) FROM head), id, available_at FROM written"
    )
    with connection.cursor() as cursor:
        cursor.execute(statement, [*head_params, *params])
        found = cursor.fetchall()
    for _, message_id, available_at in found:
        if (message := undue.get(str(message_id))) is not None:
            message.available_at = available_at
    written(using=using, messages=messages, inline=inline)
    return int(found[0][0])


def written(*, using: str, messages: list[OutboxMessage], inline: bool = False) -> None:
    """Publish `messages`, whose rows the caller wrote in its own statement (the engine writes
    them with its run, `orchestration.engine.run.write_runs`), once the transaction commits: the
    undelayed ones; the delayed ones are the relay's once due. With `inline`, as `enqueue`'s."""
    now = [m for m in messages if not m.delayed]
    if now:
        transaction.on_commit(lambda: publish(using=using, messages=now, inline=inline), using=using, robust=True)


def _insert(using: str, messages: list[OutboxMessage]) -> None:
    """Write the rows in one INSERT: on PostgreSQL hand-written from a cached template
    (`rows.insert`; the ORM's compiled INSERT cost more than the statement), elsewhere through the
    ORM. A row with no due time of its own is due at the database's now (its `db_default`),
    which the INSERT returns to it, as the ORM's does."""
    connection = connections[using]
    if connection.vendor != "postgresql":
        OutboxMessage.objects.using(using).bulk_create(messages)
        return
    sql, params = rows.insert(OutboxMessage, messages, connection)
    undue = {str(m.id): m for m in messages if not isinstance(m.available_at, datetime)}
    with connection.cursor() as cursor:
        if not undue:
            cursor.execute(sql, params)
            return
        cursor.execute(sql + " RETURNING id, available_at", params)
        for message_id, available_at in cursor.fetchall():
            if (message := undue.get(str(message_id))) is not None:
                message.available_at = available_at


def message(
    *, task: str, queue: str, payload: dict[str, Any], delay: float = 0.0, now: datetime | None = None
) -> OutboxMessage:
    """A message for `enqueue_many`, carrying the trace context current now. A delayed one needs
    `now`, the caller's database-clock reading (as `enqueue`'s)."""
    if delay > 0 and now is None:
        raise ValueError("a delayed outbox message needs the database clock's now")
    due = {"available_at": now + timedelta(seconds=delay)} if now is not None else {}
    return OutboxMessage(
        task=task,
        queue=queue,
        payload=payload,
        delayed=delay > 0,
        trace_context=observability.trace_context(),
        **due,
    )


# Runners of a batch of inline messages of one task (task name -> fn(messages) -> for each,
# whether it ran); the engine registers the replies' runner. A task without one runs its
# inline messages one at a time.
BATCH_RUNNERS: dict[str, Callable[[list[OutboxMessage]], list[bool]]] = {}
# Tasks whose messages only their batch runner can run (a batched task's body takes a batch).
BATCH_ONLY: set[str] = set()
# Tasks whose messages of one key in one round of a drain are meant to run at the same time (a
# saga's commands to several services: parallel steps) -> the key of a message. The first of a
# key runs here; the others are published, to run meanwhile in other processes, where a round
# would run them one after another, unless what runs here before them is quick (`RUN_MS`).
FAN_OUT_KEYS: dict[str, Callable[[OutboxMessage], Any]] = {}
# Those tasks -> how long a message is expected to take to run here, in ms (None: not known).
RUN_MS: dict[str, Callable[[OutboxMessage], float | None]] = {}


def runs_here(message: OutboxMessage) -> bool:
    """Whether this process may run `message` itself: it is a worker running a task off the
    broker (not the web process, not a test's direct call), and it consumes the message's
    queue, so a worker like this one would have taken the message anyway."""
    if not settings.SAGA_INLINE_DELIVERY:
        return False
    task = get_current_task()
    if task is None or task.request.called_directly or task.request.is_eager:
        return False
    if message.task not in current_app.tasks:
        return False
    return message.queue in current_app.amqp.queues.consume_from


def run_inline(message: OutboxMessage) -> bool:
    """Run `message`'s task in this process, right after the commit that wrote it. False if it
    failed: the caller then publishes it as usual (a task is idempotent, so a run that got
    partway is harmless). A crash during the run leaves the row unpublished: the relay sends it
    after its grace, as after a crash before any publish."""
    try:
        with tracing.restored(message.trace_context):
            current_app.tasks[message.task].run(message.payload)
    except Exception:
        logger.warning("inline run of %s failed; publishing it instead", message.task, exc_info=True)
        return False
    return True


def _send(message: OutboxMessage) -> None:
    # No countdown, ever: a delayed message reaches this point only once it is due.
    for _ in range(2 if settings.SAGA_FAULT_DUPLICATE_DELIVERY else 1):
        with tracing.restored(message.trace_context):  # the trace of the transaction that wrote it
            current_app.send_task(
                message.task,
                args=[message.payload],
                argsrepr=argsrepr(message.payload),
                kwargsrepr="{}",
                queue=message.queue,
                task_id=str(message.id),
                retry_policy=PUBLISH_RETRY_POLICY,
                headers=observability.message_headers(message),
                producer=getattr(_sending, "producer", None),
            )


# What a message's arguments show in monitoring (Flower, `celery inspect`, the task's log
# lines): the keys that identify it. Celery's default, a `saferepr` of the whole payload, was 1 %
# of a worker's CPU under `make bench`, and showed sealed tokens and whole contexts.
ARGSREPR_KEYS = ("saga_id", "step", "op", "operation", "attempt", "event", "reference", "notification_id")


def argsrepr(payload: Any) -> str:
    """The monitoring summary of a message's one argument: its identifying keys, then `...`
    if it has others."""
    if not isinstance(payload, dict):
        return "[...]"
    shown = ", ".join(f"{key!r}: {payload[key]!r}" for key in ARGSREPR_KEYS if key in payload)
    rest = ", ..." if len(payload) > sum(key in payload for key in ARGSREPR_KEYS) else ""
    return f"[{{{shown}{rest}}}]" if shown else f"[{{{rest[2:]}}}]"


_sending = threading.local()


@contextlib.contextmanager
def _together(count: int) -> Iterator[None]:
    """Send the messages published inside this block in one broker round trip where the
    transport can (kombu's publish batch: one Redis pipeline of LPUSHes), when there are
    several; each as usual otherwise. The batch goes when the block ends."""
    if count < 2 or getattr(_sending, "producer", None) is not None:
        yield
        return
    with current_app.producer_or_acquire() as producer, producer.batch():
        _sending.producer = producer
        try:
            yield
        finally:
            _sending.producer = None


_deferred = threading.local()


@contextlib.contextmanager
def inline_after() -> Iterator[None]:
    """Hold the inline runs of the messages committed inside this block until it ends (a
    service's command: its reply is applied once the attempt's own span and metrics are done,
    not counted as the service's handler time; its `answered` mark goes with the reply's
    application, `attempts.answers_held`)."""
    held: list[tuple[str, OutboxMessage]] = []
    previous = getattr(_deferred, "held", None)
    _deferred.held = held
    # The `answered` marks of the commands run in this block go with the breaker round trip of
    # their replies' application, in the drain that follows (kernel/attempts.py).
    with attempts.answers_held():
        try:
            yield
        except BaseException:
            # Leaving on an error (a time limit): send what committed, run nothing more here.
            _deferred.held = previous
            for using, message in held:
                publish(using=using, messages=[message])
            raise
        _deferred.held = previous
        _publish_inline(held)


_drain = threading.local()


# One group of a drain's round: a task's messages to one queue, each with the database whose
# outbox holds it (a reply from every service's database: one batch).
Group = tuple[str, list[tuple[str, OutboxMessage]]]


def _publish_inline(held: list[tuple[str, OutboxMessage]]) -> int:
    """Run each message here if this worker may (`runs_here`); publish what did not run. Returns
    how many ran here.

    The messages that these runs commit in turn (a reply's next commands, a command's reply) are
    queued and run by the same loop, round after round (a drain), not by nested calls: a saga's
    whole flow may run here, and each round groups what several sagas sent into batches (by
    task and queue, whatever database wrote them). The rows that ran are marked published once
    per database when the drain ends. Past `SAGA_INLINE_BUDGET_MS` of one drain, what is left is
    published instead; leaving on an error (a time limit) publishes what is left and runs
    nothing more."""
    queue: list[tuple[str, OutboxMessage]] | None = getattr(_drain, "queue", None)
    if queue is not None:
        queue.extend(held)
        return 0
    _drain.queue = queue = list(held)
    deadline = time.monotonic() + settings.SAGA_INLINE_BUDGET_MS / 1000
    ran: dict[str, list[Any]] = {}
    groups: list[Group] = []
    # A command's `answered` mark rides with the breaker round trip of the reply's application.
    with attempts.answers_held():
        try:
            while queue:
                carried = attempts.held_now()  # marks of the round before: its replies run in this one
                inline = time.monotonic() < deadline
                groups[:] = _fanned_out(_grouped(queue)) if inline else _grouped(queue)
                queue.clear()
                while groups:
                    task, items = groups.pop(0)
                    _run_group(task, items, ran, inline=inline)
                attempts.flush_held(carried)  # what no breaker round trip took (breakers off)
        except BaseException:
            _drain.queue = None
            for _task, items in groups:
                queue.extend(items)
            _publish_each(queue)
            raise
        finally:
            _drain.queue = None
            for using, ids in ran.items():
                _mark_published(using, ids)
    return sum(len(ids) for ids in ran.values())


def _fanned_out(groups: list[Group]) -> list[Group]:
    """Publish, before the round runs anything, each message whose fan-out key an earlier group
    of the round holds (a parallel step of a saga whose other branch runs here), so it runs
    meanwhile in another process; return what is left to run here.

    Such a message stays here if what runs here before it is expected to take less than
    SAGA_FAN_OUT_AFTER_MS (`RUN_MS`; unknown counts as long): a broker hop and another process's
    pickup would cost more than the wait, and the replies of the steps run here are applied
    together in the next round."""
    limit = settings.SAGA_FAN_OUT_AFTER_MS
    ahead: dict[Any, float | None] = {}  # key -> expected ms of what runs here first (None: unknown)
    left: list[Group] = []
    for task, items in groups:
        key_of = FAN_OUT_KEYS.get(task)
        if key_of is None:
            left.append((task, items))
            continue
        cost_of = RUN_MS.get(task)
        here: list[tuple[str, OutboxMessage]] = []
        meanwhile: list[tuple[str, OutboxMessage]] = []
        for using, message in items:
            key = key_of(message)
            waits = ahead.get(key, 0.0)
            if key in ahead and (waits is None or waits >= limit):
                meanwhile.append((using, message))
                continue
            here.append((using, message))
            cost = cost_of(message) if cost_of is not None else None
            ahead[key] = None if waits is None or cost is None else waits + cost
        _publish_each(meanwhile)
        if here:
            left.append((task, here))
    return left


def _grouped(held: list[tuple[str, OutboxMessage]]) -> list[Group]:
    """`held` by task and queue, in the order first seen."""
    groups: dict[tuple[str, str], list[tuple[str, OutboxMessage]]] = {}
    for using, message in held:
        groups.setdefault((message.task, message.queue), []).append((using, message))
    return [(task, items) for (task, _queue), items in groups.items()]


def _publish_each(held: list[tuple[str, OutboxMessage]]) -> None:
    """Publish `held`, each database's messages together."""
    by_database: dict[str, list[OutboxMessage]] = {}
    for using, message in held:
        by_database.setdefault(using, []).append(message)
    for using, messages in by_database.items():
        publish(using=using, messages=messages)


def _run_group(task: str, items: list[tuple[str, OutboxMessage]], ran: dict[str, list[Any]], *, inline: bool) -> None:
    """Run one task's messages to one queue here, as one batch when the task has a batch runner,
    adding the ids of those that ran to `ran` (by database); publish the others."""
    if not inline or not runs_here(items[0][1]):
        _publish_each(items)
        return
    messages = [message for _using, message in items]
    runner = BATCH_RUNNERS.get(task)
    if runner is not None and (len(messages) > 1 or task in BATCH_ONLY):
        oks = _run_batch_inline(runner, messages)
    else:
        oks = [run_inline(message) for message in messages]
    for (using, message), ok in zip(items, oks, strict=True):
        if ok:
            ran.setdefault(using, []).append(message.id)
    _publish_each([item for item, ok in zip(items, oks, strict=True) if not ok])


def _run_batch_inline(runner: Callable[[list[OutboxMessage]], list[bool]], messages: list[OutboxMessage]) -> list[bool]:
    try:
        return runner(messages)
    except Exception:
        logger.warning("inline run of a batch of %d failed; publishing it instead", len(messages), exc_info=True)
        return [False] * len(messages)


def publish(*, using: str, messages: list[OutboxMessage], inline: bool = False) -> int:
    """Send `messages` to the broker, then mark them published. Returns how many were sent.
    With `inline`, a message this worker may run itself is run here instead (`runs_here`), at
    the end of the enclosing `inline_after` block if there is one."""
    if inline:
        held = getattr(_deferred, "held", None)
        if held is None:
            return _publish_inline([(using, message) for message in messages])
        held.extend((using, message) for message in messages)
        return 0
    sent = []
    try:
        with _together(len(messages)):
            for message in messages:
                try:
                    _send(message)
                except Exception:
                    logger.warning(
                        "outbox publish failed; the sweep will retry", exc_info=True, extra={"task": message.task}
                    )
                    break
                sent.append(message.id)
    except Exception:  # the batch's one round trip failed: none counts as sent
        logger.warning("outbox publish of %d messages failed; the sweep will retry", len(sent), exc_info=True)
        sent = []
    if sent:
        _mark_published(using, sent)
    if len(sent) < len(messages):
        failed = messages[len(sent)].id
        OutboxMessage.objects.using(using).filter(id=failed).update(publish_attempts=F("publish_attempts") + 1)
    return len(sent)


def _mark_published(using: str, ids: list[Any]) -> None:
    connection = connections[using]
    if connection.vendor == "postgresql" and not connection.in_atomic_block:
        # Losing this mark in a server crash only means the sweep publishes the message again
        # (consumers are idempotent), so it need not wait for its WAL flush: one fsync saved per
        # message on the hot path. One statement in autocommit, its own transaction, whose
        # `set_config(..., is_local => true)` is SET LOCAL for that transaction: one round trip
        # where BEGIN, SET LOCAL, UPDATE and COMMIT took four.
        table = connection.ops.quote_name(OutboxMessage._meta.db_table)
        with connection.cursor() as cursor:
            cursor.execute(
                f"UPDATE {table} SET published_at = %s"  # noqa: S608 (the model's own table name)
                " FROM (SELECT set_config('synchronous_commit', 'off', true)) AS async_commit"
                " WHERE id = ANY(%s::uuid[])",
                [timezone.now(), [str(i) for i in ids]],
            )
        return
    with transaction.atomic(using=using):
        OutboxMessage.objects.using(using).filter(id__in=ids).update(published_at=timezone.now())


def relay_due(*, using: str, limit: int = 500) -> int:
    """Publish what the fast path did not: rows unpublished past the grace period, and delayed
    rows as soon as they are due (the fast path never takes those, so no grace)."""
    now = db_now(using)
    with transaction.atomic(using=using):
        rows = OutboxMessage.objects.using(using).filter(
            Q(delayed=True) | Q(available_at__lte=now - SWEEP_GRACE), published_at__isnull=True, available_at__lte=now
        )
        if connections[using].features.has_select_for_update_skip_locked:
            rows = rows.select_for_update(skip_locked=True)
        messages = list(rows.order_by("available_at")[:limit])
        # Published inside the transaction so a second sweeper skips these locked rows; a crash
        # after sending and before commit only means they are sent again.
        sent = publish(using=using, messages=messages)
        if sent:
            faults.crash_in_relay(using)
        return sent


def republish(*, using: str, ids: list[Any]) -> int:
    """Publish these messages again, published or not: for a consumer that evidently never got
    one (a broker restart loses queued messages after they were published)."""
    return publish(using=using, messages=list(OutboxMessage.objects.using(using).filter(id__in=ids)))


def pending_count(*, using: str) -> int:
    return OutboxMessage.objects.using(using).filter(published_at__isnull=True).count()
