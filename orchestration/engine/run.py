"""The run plumbing: one engine transaction's working set (the locked saga, its steps, the events
it appends) and what every style does with it (record, lease, send a command, park, flush).

Every entry point runs in one transaction on the orchestrator's database with the saga row
locked (`locked`): it applies the news to the steps, records an event per transition, and writes
the next commands to the outbox, which publishes them after commit. Time comes from the database
clock: leases, retry times and the saga deadline are stored as absolute database times.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from django.conf import settings
from django.db import connections, transaction
from django.utils import timezone

from sagaplatform.kernel import breakers, clock, faults, outbox, registry, rows
from sagaplatform.kernel.commands import ACTION, COMPENSATE, CONFIRM, Command
from sagaplatform.kernel.models import OutboxMessage
from sagaplatform.observability import hooks as observability
from sagaplatform.observability import tracing

from .. import definitions, rules
from ..definitions import SagaDefinition, StepSpec
from ..models import Alert, DefinitionSnapshot, Saga, SagaEvent, SagaStep
from . import style

logger = logging.getLogger("orchestration.engine")

DB = "default"
State = SagaStep.State
# The state sets are the rules' (orchestration/rules.py), named as the engine always has.
IN_FLIGHT = rules.STEP_IN_FLIGHT
DONE = rules.STEP_DONE
CANCELLED = rules.CANCELLED  # the failure code of a saga a person cancelled

# Called with every run about to commit (the live feed registers itself in AppConfig.ready).
ON_FLUSH: list[Callable[[Run], None]] = []

# A JSON object as the engine stores and passes it on (a saga's context, a failure, a reply,
# an event's data): its shape is the definition's and the wire format's, not the engine's.
JSON = dict[str, Any]
SagaId = uuid.UUID | str
# Whether a queue has nothing waiting in it (the sweeper's, asked before sending an attempt again).
QueueIdle = Callable[[str], bool]


@dataclass
class Run:
    """One engine transaction's working set: the locked saga, its steps, the events to append."""

    saga: Saga
    definition: SagaDefinition
    steps: dict[str, SagaStep]
    now: datetime
    actor: str = "engine"
    events: list[SagaEvent] = field(default_factory=list)
    dirty: set[str] = field(default_factory=set)
    alerts: list[Alert] = field(default_factory=list)
    # The metrics of this transaction's events, counted when it commits (observability hooks).
    metrics_pending: list[Any] | None = None
    # In a batch (`locked_many`): the commands this run sends, written with the whole batch's
    # in one INSERT. None: each is written as it is sent.
    outbox: list[Any] | None = None
    # A saga created by this run and not yet written (`create_saga(deferred=True)`): its row and
    # its steps are inserted, in their final state, by the statement that writes the run.
    created: bool = False

    def record(
        self, kind: str, *, step: SagaStep | None = None, from_state: str = "", data: JSON | None = None
    ) -> None:
        self.saga.version += 1
        if step is not None:
            self.dirty.add(step.name)
        self.events.append(
            SagaEvent(
                saga=self.saga,
                seq=self.saga.version,
                step=step.name if step else "",
                kind=kind,
                from_state=from_state,
                to_state=step.state if step else self.saga.state,
                data=data or {},
                actor=self.actor,
                created_at=self.now,
            )
        )
        observability.saga_event(self, self.events[-1], step)
        logger.info(
            "saga %s %s %s",
            self.saga.id,
            kind,
            step.name if step else "",
            extra={"saga_id": str(self.saga.id), "step": step.name if step else "", "event": kind},
        )

    def flush(self) -> None:
        flush_many([self])

    def changed_steps(self) -> list[SagaStep]:
        return [self.steps[name] for name in self.dirty]

    def action_steps(self) -> list[tuple[StepSpec, SagaStep]]:
        return [(spec, self.steps[spec.name]) for spec in self.definition.steps]

    def failure_steps(self) -> list[tuple[StepSpec, SagaStep]]:
        return [(spec, self.steps[spec.name]) for spec in self.definition.on_failure]

    def past_pivot(self) -> bool:
        return any(spec.pivot and step.state == State.SUCCEEDED for spec, step in self.action_steps())


# The columns a run never changes: a saga's id and creation time; a step's identity and place
# in the graph; an event's id (the database numbers it).
_SAGA_FIXED = frozenset({"id", "created_at"})
_STEP_FIXED = frozenset({"id", "saga", "name", "kind", "position", "service"})
_EVENT_FIXED = frozenset({"id"})
_STEP_ID = frozenset({"id"})  # numbered by the database


def flush_many(runs: list[Run]) -> None:
    """Write runs: their sagas, changed steps, new events and the commands they send (on
    PostgreSQL in one statement for all, `write_runs`), and their alerts; then hand each to the
    ON_FLUSH hooks. Once the transaction commits, a worker that consumes the commands' queues
    runs them itself (`outbox.publish`, inline); anywhere else they are published."""
    if not runs:
        return
    for run in runs:
        if run.saga.is_terminal:
            run.saga.deadline_at = None  # ended: nothing left to expire (saga_deadline_open keeps open sagas only)
    messages = [message for run in runs for message in run.outbox or ()]
    if connections[DB].vendor == "postgresql":
        write_runs(
            [(run.saga, run.changed_steps(), run.events) for run in runs if not run.created],
            messages,
            created=[(run.definition, run.saga, list(run.steps.values()), run.events) for run in runs if run.created],
        )
        for run in runs:
            run.created = False
        outbox.written(using=DB, messages=messages, inline=settings.SAGA_INLINE_COMMANDS)
    else:
        for run in runs:
            run.saga.save(using=DB)
            for step in run.changed_steps():
                step.save(using=DB)
        SagaEvent.objects.using(DB).bulk_create([event for run in runs for event in run.events])
        outbox.enqueue_many(using=DB, messages=messages, inline=settings.SAGA_INLINE_COMMANDS)
    for run in runs:
        run.outbox = [] if run.outbox is not None else None
    Alert.objects.using(DB).bulk_create([alert for run in runs for alert in run.alerts])
    for run in runs:
        for hook in ON_FLUSH:
            hook(run)


def write_runs(
    runs: list[tuple[Saga, list[SagaStep], list[SagaEvent]]],
    messages: Sequence[Any] = (),
    *,
    created: Sequence[tuple[SagaDefinition, Saga, list[SagaStep], list[SagaEvent]]] = (),
) -> None:
    """Write runs in one statement (PostgreSQL): the sagas' UPDATE and their changed steps'
    UPDATE (each `FROM (VALUES ...)`), their events' INSERT and the outbox rows of `messages`, as
    data-modifying CTEs of one query: one round trip for a whole batch, where a save per row
    took one each. Hand-written rather than `bulk_update`, whose CASE per column costs more CPU
    than it saves (`sagaplatform.kernel.rows`). Only the model's own quoted names are
    interpolated; every value is a parameter.

    The sagas of `created` (definition, saga, every step, events) are inserted instead, as they
    stand, with their definitions' snapshots (if new): a saga started in this transaction is
    written once, not inserted and then updated. Their steps get their ids back. A saga that
    exists already raises IntegrityError."""
    connection = connections[DB]
    quote = connection.ops.quote_name
    parts: list[tuple[str, list[Any]]] = []
    new_steps = [step for _, _, steps, _ in created for step in steps]
    if created:
        snapshots = {definition.digest: definition for definition, _, _, _ in created}
        snapshot_sql, snapshot_params = rows.insert(
            DefinitionSnapshot, [definitions.snapshot(d) for d in snapshots.values()], connection
        )
        parts.append((f"{snapshot_sql} ON CONFLICT DO NOTHING", snapshot_params))
        parts.append(rows.insert(Saga, [saga for _, saga, _, _ in created], connection))
        steps_sql, steps_params = rows.insert(SagaStep, new_steps, connection, fixed=_STEP_ID)
        parts.append((f"{steps_sql} RETURNING id, saga_id, name", steps_params))
    returning = len(parts) - 1  # the new steps' ids: what the statement returns

    def update(model: Any, fixed: frozenset[str], objects: list[Any], id_type: str) -> None:
        fields, row = rows.layout(model, fixed, connection)
        names = [quote(str(f.column)) for f in fields]
        row = row.replace("(", f"(%s::{id_type}, ", 1)
        params = []
        for obj in objects:
            params.extend(
                [str(obj.pk) if id_type == "uuid" else obj.pk, *rows.values(fields, obj, connection, add=False)]
            )
        parts.append(
            (
                f"UPDATE {quote(model._meta.db_table)} AS t SET {', '.join(f'{n} = v.{n}' for n in names)} "  # noqa: S608
                f"FROM (VALUES {', '.join([row] * len(objects))}) AS v(id, {', '.join(names)}) WHERE t.id = v.id",
                params,
            )
        )

    if runs:
        update(Saga, _SAGA_FIXED, [saga for saga, _, _ in runs], "uuid")
    steps = [step for _, changed, _ in runs for step in changed]
    if steps:
        update(SagaStep, _STEP_FIXED, steps, "bigint")
    events = [event for _, _, run_events in runs for event in run_events]
    events += [event for _, _, _, run_events in created for event in run_events]
    if events:
        parts.append(rows.insert(SagaEvent, events, connection, fixed=_EVENT_FIXED))
    if messages:
        parts.append(rows.insert(OutboxMessage, list(messages), connection))
    last_params: list[Any]
    if created:  # every part a CTE; the query returns the new steps' ids
        ctes, last_sql, last_params = parts, f"SELECT id, saga_id, name FROM w{returning}", []  # noqa: S608
    else:
        *ctes, (last_sql, last_params) = parts
    sql = ""
    all_params: list[Any] = []
    if ctes:
        sql = "WITH " + ", ".join(f"w{i} AS ({cte_sql})" for i, (cte_sql, _) in enumerate(ctes)) + " "
        for _, cte_params in ctes:
            all_params.extend(cte_params)
    with connection.cursor() as cursor:
        cursor.execute(sql + last_sql, [*all_params, *last_params])
        ids = {(saga_id, name): step_id for step_id, saga_id, name in cursor.fetchall()} if created else {}
    for _, saga, saga_steps, _ in created:
        for obj in (saga, *saga_steps):
            obj._state.adding, obj._state.db = False, DB
        key = uuid.UUID(str(saga.pk))  # however the caller spelled it
        for step in saga_steps:
            step.id = ids[(key, step.name)]


def create_saga(
    *, saga_id: SagaId, definition: SagaDefinition, context: JSON, now: datetime | None, deferred: bool = False
) -> Run:
    """Create a saga and its steps (pending), in the caller's transaction. With `now`, the saga
    gets its deadline from it; without, it has none (no one could act on it). The definition's
    snapshot is recorded with it (`definitions.record`). `deferred` (with `now`, on PostgreSQL):
    nothing is written yet; the run's first flush inserts the saga and its steps as they then
    stand (`write_runs`), in its one statement."""
    saga = Saga(
        id=saga_id,
        definition=definition.name,
        definition_hash=definition.digest,
        definition_label=definition.label,
        context=context,
        deadline_at=now + timedelta(seconds=definition.effective_deadline()) if now else None,
    )
    steps = [
        SagaStep(saga=saga, name=s.name, kind=kind, position=i, service=s.service)
        for kind, group in (
            (SagaStep.Kind.ACTION, definition.steps),
            (SagaStep.Kind.ON_FAILURE, definition.on_failure),
        )
        for i, s in enumerate(group)
    ]
    connection = connections[DB]
    if connection.vendor == "postgresql" and deferred and now is not None:
        saga.created_at = timezone.now()  # as its INSERT will set it (auto_now_add), for what reads it first
        return Run(saga=saga, definition=definition, steps={s.name: s for s in steps}, now=now, created=True)
    if connection.vendor == "postgresql":
        _insert_saga(connection, definition, saga, steps)
    else:
        definitions.record(definition, using=DB)
        saga.save(using=DB, force_insert=True)
        SagaStep.objects.using(DB).bulk_create(steps)
    return Run(saga=saga, definition=definition, steps={s.name: s for s in steps}, now=now or saga.created_at)


def _insert_saga(connection: Any, definition: SagaDefinition, saga: Saga, steps: list[SagaStep]) -> None:
    """Insert the definition's snapshot (if new), the saga and its steps in one statement of
    data-modifying CTEs (PostgreSQL), where the ORM took three compiled INSERTs; the steps get
    their ids back. A saga that exists already raises IntegrityError, as `create` did."""
    snapshot_sql, snapshot_params = rows.insert(DefinitionSnapshot, [definitions.snapshot(definition)], connection)
    saga_sql, saga_params = rows.insert(Saga, [saga], connection)
    steps_sql, steps_params = rows.insert(SagaStep, steps, connection, fixed=_STEP_ID)
    with connection.cursor() as cursor:
        cursor.execute(
            f"WITH w0 AS ({snapshot_sql} ON CONFLICT DO NOTHING), w1 AS ({saga_sql}) {steps_sql} RETURNING id, name",
            [*snapshot_params, *saga_params, *steps_params],
        )
        ids = {name: step_id for step_id, name in cursor.fetchall()}
    for obj in (saga, *steps):
        obj._state.adding, obj._state.db = False, DB
    for step in steps:
        step.id = ids[step.name]


def load(saga_id: SagaId, *, actor: str = "engine", skip_locked: bool = False) -> Run | None:
    """Lock the saga and read its steps, in the caller's transaction (None: no such saga, or
    locked by another with `skip_locked`)."""
    key = str(uuid.UUID(str(saga_id)))
    sagas, steps = lock_sagas([key], skip_locked=skip_locked)
    saga = sagas.get(key)
    if saga is None:
        return None
    now = saga.db_now  # type: ignore[attr-defined]  # read with the lock (lock_sagas)
    return Run(saga=saga, definition=definitions.for_saga(saga), steps=steps[key], now=now, actor=actor)


# The reads of `lock_sagas` on PostgreSQL, by (database alias, skip_locked): the same text for
# any number of sagas (`= ANY(array)`), so a worker prepares each once, and no ORM query is
# compiled per engine transaction.
_LOCK_SQL: dict[tuple[str, bool], tuple[str, str]] = {}


def _lock_sql(connection: Any, skip_locked: bool) -> tuple[str, str]:
    """(the sagas locked with their steps, in one statement; the steps of some sagas alone)."""
    found = _LOCK_SQL.get((connection.alias, skip_locked))
    if found is None:
        quote = connection.ops.quote_name
        saga_table, step_table = quote(Saga._meta.db_table), quote(SagaStep._meta.db_table)

        def columns(model: Any, alias: str) -> str:
            return ", ".join(f"{alias}.{quote(str(f.column))}" for f in model._meta.concrete_fields)

        found = _LOCK_SQL[(connection.alias, skip_locked)] = (
            # Locked in id order, as every batch locks them, with the database clock (Django's
            # Now() on PostgreSQL) and their steps: one round trip for all. The rows of one
            # shape or the other (a saga, or a step), each NULL where it is the other: a join
            # ON false gives those NULLs their column types.
            #
            # The steps are read in the statement's snapshot, taken before the locks. If a saga
            # was changed by a transaction that committed after it (one this lock waited for),
            # the lock returns the saga's newest row but the snapshot shows its steps as they
            # were: `fresh` is false (the row locked is not the row the snapshot sees), and
            # `lock_sagas` reads those sagas' steps again. Every write of a step writes its saga
            # row in the same transaction (`write_runs`, `create_saga`).
            f"WITH locked AS MATERIALIZED (SELECT {columns(Saga, 's')}, s.ctid AS locked_row "  # noqa: S608
            f"FROM {saga_table} s WHERE s.id = ANY(%s::uuid[]) ORDER BY s.id FOR UPDATE"
            f"{' SKIP LOCKED' if skip_locked else ''}) "
            f"SELECT {columns(Saga, 'l')}, {columns(SagaStep, 't')}, STATEMENT_TIMESTAMP(), "
            "COALESCE(seen.ctid = l.locked_row, false) "
            f"FROM locked l LEFT JOIN {saga_table} seen ON seen.id = l.id LEFT JOIN {step_table} t ON false "
            #
            # Each locked saga's steps are read by a lookup of their own (LATERAL ... OFFSET 0,
            # which the planner does not flatten into a join). A worker keeps its prepared
            # statement's generic plan while the table grows: as a semi-join planned from
            # statistics over a few dozen sagas, it went on reading every step by sequential
            # scan (88 buffers per call against 17, at 2,200 steps); as a lookup per saga it
            # reads them by index. Statistics over one or two sagas make any form scan:
            # autovacuum's analyze keeps them current.
            f"UNION ALL SELECT {columns(Saga, 'n')}, {columns(SagaStep, 't')}, NULL, NULL "
            f"FROM locked l CROSS JOIN LATERAL (SELECT * FROM {step_table} s WHERE s.saga_id = l.id OFFSET 0) t "
            f"LEFT JOIN {saga_table} n ON false",
            f"SELECT {columns(SagaStep, 't')} FROM {step_table} t WHERE t.saga_id = ANY(%s::uuid[])",  # noqa: S608
        )
    return found


# (model, vendor) -> the converters of each of its columns that has any, as the ORM applies them.
_CONVERTERS: dict[tuple[Any, str], list[tuple[int, Any, list[Any]]]] = {}


def _instances(model: Any, rows: list[tuple[Any, ...]], connection: Any) -> Iterator[tuple[Any, tuple[Any, ...]]]:
    """Model instances from rows that hold every concrete column in order (then anything else,
    returned beside each), converted as the ORM converts them: what `Model.objects.raw()` does,
    without working out its column order and converters for every query (profiled: a fifth of
    an engine transaction's lock on one saga)."""
    key = (model, connection.vendor)
    converters = _CONVERTERS.get(key)
    if converters is None:
        converters = []
        for i, column_field in enumerate(model._meta.concrete_fields):
            col = column_field.get_col(model._meta.db_table)
            found = connection.ops.get_db_converters(col) + col.get_db_converters(connection)
            if found:
                converters.append((i, col, found))
        _CONVERTERS[key] = converters
    width = len(model._meta.concrete_fields)
    for row in rows:
        values = list(row[:width])
        for i, col, functions in converters:
            value = values[i]
            for function in functions:
                value = function(value, col, connection)
            values[i] = value
        yield model.from_db(connection.alias, None, values), row[width:]


def lock_sagas(ids: list[str], *, skip_locked: bool = False) -> tuple[dict[str, Saga], dict[str, dict[str, SagaStep]]]:
    """Lock the sagas `ids` (in id order, with the database clock as each one's `db_now`) and
    read their steps, in the caller's transaction: on PostgreSQL in one statement (a second
    reads again the steps of a saga changed while the first waited for its lock), elsewhere in
    two. Returns the sagas found by id, and their steps by saga id and name (each step's `saga`
    the locked one). A saga missing (or locked by another, with `skip_locked`) is in neither."""
    connection = connections[DB]
    rows: Any
    if connection.vendor == "postgresql":
        lock_sql, steps_sql = _lock_sql(connection, skip_locked)
        width = len(Saga._meta.concrete_fields)
        with connection.cursor() as cursor:
            cursor.execute(lock_sql, [ids])
            read = cursor.fetchall()
            saga_rows = [row[:width] + row[-2:] for row in read if row[-1] is not None]
            step_rows = [row[width:-2] for row in read if row[-1] is None]
            found, stale = [], []
            for saga, (db_now, fresh) in _instances(Saga, saga_rows, connection):
                saga.db_now = db_now
                found.append(saga)
                if not fresh:
                    stale.append(str(saga.pk))
            rows = [step for step, _ in _instances(SagaStep, step_rows, connection)]
            if stale:  # changed since the statement began: their steps as they are now
                rows = [step for step in rows if str(step.saga_id) not in set(stale)]
                cursor.execute(steps_sql, [stale])
                rows += [step for step, _ in _instances(SagaStep, cursor.fetchall(), connection)]
    else:
        locking = Saga.objects.using(DB).select_for_update(skip_locked=skip_locked)
        found = list(locking.filter(id__in=ids).order_by("id"))
        # SQLite runs in this process: its clock is the process clock (`clock.db_now`), read to the
        # microsecond, where its own `now` keeps milliseconds and could read earlier than a
        # `db_now` taken just before.
        now = clock.db_now(DB)
        for saga in found:
            saga.db_now = now
        rows = SagaStep.objects.using(DB).filter(saga_id__in=[saga.pk for saga in found]) if found else []
    sagas = {str(saga.pk): saga for saga in found}
    steps: dict[str, dict[str, SagaStep]] = {key: {} for key in sagas}
    for step in rows:
        key = str(step.saga_id)
        step.saga = sagas[key]
        steps[key][step.name] = step
    return sagas, steps


def locked(saga_id: SagaId, apply: Callable[[Run], bool], *, actor: str = "engine", skip_locked: bool = False) -> bool:
    """Run `apply` on the locked saga; if it changed anything, advance and save. Returns that.
    The breakers' counts of the replies it applies go to Redis with its next steps' admissions
    (`breakers.together`)."""
    with breakers.together(), transaction.atomic(using=DB):
        run = load(saga_id, actor=actor, skip_locked=skip_locked)
        if run is None:
            return False
        run.outbox = []  # the commands it sends are written with the run (`flush_many`)
        if not apply(run):
            outbox.enqueue_many(using=DB, messages=run.outbox)  # none, unless sent without a change
            return False
        style.of(run.definition).advance(run)
        run.flush()
        return True


# One item of a batch: the saga, what to apply to it, and the trace context it came with.
Item = tuple[SagaId, Callable[[Run], bool], JSON | None]


def locked_many(items: list[Item], *, actor: str = "engine") -> list[bool | None]:
    """Apply many sagas' news in one transaction (a batch of replies): every saga is locked (in
    id order, one query for all, their steps in one more) and decided on its own, exactly as
    `locked` would, then written; the batch commits once. Several items for one saga are applied
    in turn to the same run, each followed by the style's `advance`, as one message after the
    other would be. If anything raises, the whole transaction rolls back and each item is applied
    again in a transaction of its own, so one bad item fails alone. Returns, for each item,
    whether it changed anything, or None if it raised (alone)."""
    if len(items) <= 1:
        return [_locked_alone(item, actor) for item in items]
    with breakers.together():
        try:
            with transaction.atomic(using=DB):
                return _apply_many(items, actor)
        except Exception:
            logger.warning("a batch of %d replies failed; applying each alone", len(items), exc_info=True)
            return [_locked_alone(item, actor) for item in items]


def _locked_alone(item: Item, actor: str) -> bool | None:
    saga_id, apply, context = item
    try:
        with tracing.restored(context):
            return locked(saga_id, apply, actor=actor)
    except Exception:
        logger.warning("saga %s: applying its news failed", saga_id, exc_info=True, extra={"saga_id": str(saga_id)})
        return None


def _apply_many(items: list[Item], actor: str) -> list[bool | None]:
    keys = [str(uuid.UUID(str(saga_id))) for saga_id, _, _ in items]  # a malformed id raises: each alone then
    ids = sorted(set(keys))
    sagas, steps = lock_sagas(ids)
    runs: dict[str, Run] = {}
    changed: set[str] = set()
    results: list[bool | None] = []
    for key, (_, apply, context) in zip(keys, items, strict=True):
        locked_saga = sagas.get(key)
        if locked_saga is None:
            results.append(False)
            continue
        run = runs.get(key)
        if run is None:
            run = runs[key] = Run(
                saga=locked_saga,
                definition=definitions.for_saga(locked_saga),
                steps=steps[key],
                now=locked_saga.db_now,  # type: ignore[attr-defined]  # read with the lock
                actor=actor,
            )
            run.outbox = []
        with tracing.restored(context):  # the commands it sends join the trace it came with
            applied = bool(apply(run))
            if applied:
                style.of(run.definition).advance(run)
                changed.add(key)
        results.append(applied)
    flush_many([runs[key] for key in ids if key in changed])
    return results


def park(run: Run, message: str) -> None:
    before = run.saga.state
    run.saga.park()
    run.saga.deadline_at = None
    run.record("saga_parked", from_state=before, data={"message": message})
    run.alerts.append(Alert(saga=run.saga, kind=Alert.Kind.SAGA_PARKED, message=message[:500]))
    logger.error("saga %s parked: %s", run.saga.id, message, extra={"saga_id": str(run.saga.id)})


def resolve_alerts(run: Run) -> None:
    Alert.objects.using(DB).filter(saga=run.saga, resolved_at__isnull=True).update(
        resolved_at=run.now, resolved_by=run.actor
    )


def lease(run: Run, step: SagaStep, spec: StepSpec, *, delay: float = 0.0) -> None:
    step.sent_at = run.now + timedelta(seconds=delay)
    step.deadline_at = step.sent_at + timedelta(seconds=spec.effective_timeout())
    run.dirty.add(step.name)


def attempt_in_flight(step: SagaStep) -> tuple[str, int]:
    """The op and attempt number of the command a step in flight waits for."""
    return {
        State.COMPENSATING: (COMPENSATE, step.compensation_attempts),
        State.CONFIRMING: (CONFIRM, step.confirm_attempts),
    }.get(step.state, (ACTION, step.attempts))


def send(run: Run, step: SagaStep, spec: StepSpec, op: str, *, attempt: int, delay: float = 0.0) -> None:
    faults.arm_after_commit(faults.ORCHESTRATOR, step.name)  # chaos: die between the commit and the publish
    payload = {key: run.saga.context.get(key) for key in spec.inputs}
    if step.kind == SagaStep.Kind.ON_FAILURE:
        payload["failure"] = run.saga.failure
    operation = {ACTION: spec.action, COMPENSATE: spec.compensation, CONFIRM: spec.confirm}[op]
    if operation is None:  # the styles send only the operations a step has
        raise ValueError(f"step {step.name} has no {op} operation")
    command = Command(
        saga_id=run.saga.id,
        step=step.name,
        op=op,
        operation=operation,
        attempt=attempt,
        payload=payload,
    )
    task = f"{spec.service}.execute"
    queue = registry.resolve(spec.service).queue  # a queue a live instance consumes (cached ~1 s)
    if run.outbox is None:
        outbox.enqueue(using=DB, task=task, queue=queue, payload=command.to_message(), delay=delay, now=run.now)
    else:
        run.outbox.append(
            outbox.message(task=task, queue=queue, payload=command.to_message(), delay=delay, now=run.now)
        )
