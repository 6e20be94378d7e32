"""The engine's own statements (orchestration/engine/run.py).

How an engine transaction locks its sagas and reads their steps (`run.lock_sagas`): every saga
asked for, locked, with the database clock and its steps attached; a missing one left out; with
`skip_locked`, one that another transaction holds left out rather than waited for. On
PostgreSQL both reads are hand-written statements whose text does not depend on how many sagas
a batch holds (one prepared statement each), and the instances are the ones the ORM would read.
There the steps come in the locking statement; a saga changed while it waited for its lock has
its steps read again.

How a saga is created (`run.create_saga`): on PostgreSQL its definition's snapshot, the saga and
its steps in one statement, the steps numbered by the database; a saga started by the engine is
inserted as it stands once its first steps started, in the statement that writes its start."""

from __future__ import annotations

import threading
import uuid

import pytest
from django.db import IntegrityError, connections, transaction
from django.test.utils import CaptureQueriesContext

from orchestration import definitions, engine
from orchestration.engine import run
from orchestration.models import DefinitionSnapshot, Saga, SagaStep
from sagaplatform.kernel.clock import db_now
from sagaplatform.kernel.models import OutboxMessage

pytestmark = pytest.mark.django_db(transaction=True, databases="__all__")

CONTEXT = {"order_id": str(uuid.uuid4()), "mode": "orchestrated", "items": [], "amount": "1.00"}


def started(count: int) -> list[str]:
    ids = sorted(str(uuid.uuid4()) for _ in range(count))
    for saga_id in ids:
        engine.saga_start(saga_id=saga_id, definition="place_order", context=CONTEXT)
    return ids


def test_every_saga_asked_for_is_locked_with_its_steps_and_the_database_clock():
    ids = started(3)
    missing = str(uuid.uuid4())
    with transaction.atomic(using="default"):
        before = db_now("default")
        with CaptureQueriesContext(connections["default"]) as queries:
            sagas, steps = run.lock_sagas([*ids, missing])
        assert sorted(sagas) == ids  # the missing one is left out
        assert missing not in steps
        for saga_id in ids:
            saga = sagas[saga_id]
            assert saga.state == Saga.State.RUNNING
            assert before <= saga.db_now <= db_now("default")
            stored = {s.name: s.state for s in SagaStep.objects.filter(saga_id=saga_id)}
            assert {name: step.state for name, step in steps[saga_id].items()} == stored
            assert all(step.saga is saga for step in steps[saga_id].values())  # no query to reach it
    if connections["default"].vendor == "postgresql":
        assert len(queries) == 1  # the locks, the clock and the steps
        assert "FOR UPDATE" in queries[0]["sql"]
        # The same text for one saga as for four: one prepared statement.
        assert statements(ids[:1]) == statements([*ids, missing])
    else:
        assert len(queries) == 2


def statements(ids: list[str]) -> list[str]:
    """The statements `lock_sagas(ids)` sends, as sent (placeholders, not values)."""
    sent: list[str] = []

    def record(execute, sql, params, many, context):
        sent.append(sql)
        return execute(sql, params, many, context)

    with transaction.atomic(using="default"), connections["default"].execute_wrapper(record):
        run.lock_sagas(ids)
    return sent


def test_the_instances_are_the_ones_the_orm_reads():
    """Every column as the ORM converts it (JSON decoded, times aware), and saved like one."""
    (saga_id,) = started(1)
    result = {"reservation": "r-1", "lines": [{"sku": "SKU-MUG", "quantity": 2}], "none": None}
    SagaStep.objects.filter(saga_id=saga_id, name="reserve_stock").update(result=result, error={"code": "x"})
    with transaction.atomic(using="default"):
        sagas, steps = run.lock_sagas([saga_id])
    saga = sagas[saga_id]

    def columns(obj) -> dict:
        return {f.attname: getattr(obj, f.attname) for f in type(obj)._meta.concrete_fields}

    assert columns(saga) == columns(Saga.objects.get(id=saga_id))
    assert isinstance(saga.context, dict)
    assert (saga._state.db, saga._state.adding) == ("default", False)
    for step in SagaStep.objects.filter(saga_id=saga_id):
        assert columns(steps[saga_id][step.name]) == columns(step)
    assert steps[saga_id]["reserve_stock"].result == result
    # Saved like an instance the ORM read: an UPDATE of the row, not a second row.
    saga.failure = {"code": "checked"}
    saga.save(update_fields=["failure"])
    assert Saga.objects.get(id=saga_id).failure == {"code": "checked"}
    assert Saga.objects.filter(id=saga_id).count() == 1


def test_a_saga_held_by_another_transaction_is_skipped_with_skip_locked_and_waited_for_without():
    if connections["default"].vendor != "postgresql":
        pytest.skip("SQLite has no row locks")
    held, free = started(2)
    locked, release, done = threading.Event(), threading.Event(), threading.Event()

    def holder() -> None:
        try:
            with transaction.atomic(using="default"):
                run.lock_sagas([held])
                locked.set()
                release.wait(10)
        finally:
            connections.close_all()
            done.set()

    thread = threading.Thread(target=holder)
    thread.start()
    try:
        assert locked.wait(10)
        with transaction.atomic(using="default"):
            sagas, steps = run.lock_sagas([held, free], skip_locked=True)
            assert list(sagas) == [free]
            assert list(steps) == [free]
        assert run.load(held, skip_locked=True) is None
        waited: list[str] = []

        def waiter() -> None:
            try:
                with transaction.atomic(using="default"):
                    waited.extend(run.lock_sagas([held])[0])
            finally:
                connections.close_all()

        second = threading.Thread(target=waiter)
        second.start()
        second.join(0.5)
        assert second.is_alive()  # without skip_locked it waits for the holder
        release.set()
        second.join(10)
        assert waited == [held]
    finally:
        release.set()
        thread.join(10)
    assert done.is_set()


def test_a_lock_that_waited_reads_the_steps_the_holder_committed():
    """The steps come in the locking statement, read in its snapshot, taken before it waited: a
    saga the holder changed meanwhile has its steps read again, as the holder committed them."""
    if connections["default"].vendor != "postgresql":
        pytest.skip("SQLite has no row locks")
    (saga_id,) = started(1)
    locked, release = threading.Event(), threading.Event()

    def holder() -> None:
        try:
            with transaction.atomic(using="default"):
                sagas, steps = run.lock_sagas([saga_id])
                locked.set()
                release.wait(10)
                # As the engine writes a run: the step and its saga row, in one transaction.
                step = steps[saga_id]["reserve_stock"]
                SagaStep.objects.filter(pk=step.pk).update(attempts=7, result={"held": True})
                Saga.objects.filter(id=saga_id).update(version=sagas[saga_id].version + 1)
        finally:
            connections.close_all()

    thread = threading.Thread(target=holder)
    thread.start()
    read: list = []

    def waiter() -> None:
        try:
            with transaction.atomic(using="default"), CaptureQueriesContext(connections["default"]) as queries:
                read.append(run.lock_sagas([saga_id]))
                read.append(len(queries))
        finally:
            connections.close_all()

    try:
        assert locked.wait(10)
        second = threading.Thread(target=waiter)
        second.start()
        second.join(0.5)
        assert second.is_alive()  # waiting for the holder's lock, its snapshot already taken
        release.set()
        second.join(10)
    finally:
        release.set()
        thread.join(10)
    (sagas, steps), statements_sent = read
    assert sagas[saga_id].version == Saga.objects.get(id=saga_id).version
    step = steps[saga_id]["reserve_stock"]
    assert (step.attempts, step.result) == (7, {"held": True})
    assert statements_sent == 2  # the steps of the changed saga, read again
    # Unchanged meanwhile: one statement.
    with transaction.atomic(using="default"), CaptureQueriesContext(connections["default"]) as queries:
        assert run.lock_sagas([saga_id])[1][saga_id]["reserve_stock"].attempts == 7
    assert len(queries) == 1


def test_a_saga_its_steps_and_its_snapshot_are_created_in_one_statement():
    saga_id = str(uuid.uuid4())
    definition = definitions.PLACE_ORDER
    with transaction.atomic(using="default"):
        now = db_now("default")
        with CaptureQueriesContext(connections["default"]) as queries:
            created = run.create_saga(saga_id=saga_id, definition=definition, context=CONTEXT, now=now)
    if connections["default"].vendor == "postgresql":
        assert len(queries) == 1
    stored = {s.name: s for s in SagaStep.objects.filter(saga_id=saga_id)}
    assert {name: step.pk for name, step in created.steps.items()} == {name: s.pk for name, s in stored.items()}
    assert [s.name for s in sorted(stored.values(), key=lambda s: (s.kind, s.position))] == [
        *(s.name for s in definition.steps),
        *(s.name for s in definition.on_failure),
    ]
    saga = Saga.objects.get(id=saga_id)
    assert (saga.state, saga.context, saga.definition_hash) == (Saga.State.PENDING, CONTEXT, definition.digest)
    assert saga.created_at == created.saga.created_at
    assert DefinitionSnapshot.objects.get(digest=definition.digest).graph == definition.graph()
    # A second saga on the same definition: the snapshot is kept once; the same id again fails
    # and writes nothing.
    with transaction.atomic(using="default"):
        run.create_saga(saga_id=str(uuid.uuid4()), definition=definition, context=CONTEXT, now=None)
    assert DefinitionSnapshot.objects.filter(digest=definition.digest).count() == 1
    with pytest.raises(IntegrityError), transaction.atomic(using="default"):
        run.create_saga(saga_id=saga_id, definition=definition, context={}, now=None)
    assert SagaStep.objects.filter(saga_id=saga_id).count() == len(stored)


@pytest.mark.postgres
def test_the_steps_are_read_by_index_with_a_plan_made_while_the_table_was_small():
    """A worker keeps its prepared statement's generic plan, made from the statistics of the
    table as it was, while the table grows under it. The lock statement reads each saga's steps
    by a lookup of its own: planned from statistics over 20 sagas, it still reads them by index
    once the table holds 320 (as a semi-join it became a sequential scan of every step).
    Statistics over one or two sagas would make any form scan: autovacuum's analyze, as the
    table grows, is what keeps plans right (loadtest/autovacuum.py)."""
    ids = started(20)
    connection = connections["default"]
    with connection.cursor() as cursor:
        cursor.execute("ANALYZE orchestration_saga")
        cursor.execute("ANALYZE orchestration_sagastep")
    template = Saga.objects.get(id=ids[0])
    template_steps = list(SagaStep.objects.filter(saga_id=ids[0]))
    sagas, steps = [], []
    for _ in range(300):
        saga = Saga(**{f.attname: getattr(template, f.attname) for f in Saga._meta.concrete_fields})
        saga.pk = uuid.uuid4()
        sagas.append(saga)
        for step in template_steps:
            copy = SagaStep(**{f.attname: getattr(step, f.attname) for f in SagaStep._meta.concrete_fields})
            copy.pk, copy.saga_id = None, saga.pk
            steps.append(copy)
    Saga.objects.bulk_create(sagas)
    SagaStep.objects.bulk_create(steps)

    lock_sql, _ = run._lock_sql(connection, False)
    wanted = "'{" + ",".join(ids) + "}'::uuid[]"
    with transaction.atomic(using="default"), connection.cursor() as cursor:
        cursor.execute("SET LOCAL plan_cache_mode = force_generic_plan")
        cursor.execute("PREPARE lock_plan(uuid[]) AS " + lock_sql.replace("%s", "$1"))
        cursor.execute(f"EXPLAIN EXECUTE lock_plan({wanted})")
        plan = "\n".join(row[0] for row in cursor.fetchall())
        cursor.execute("DEALLOCATE lock_plan")
    assert "Seq Scan on orchestration_sagastep" not in plan, plan
    assert "orchestration_sagastep" in plan


@pytest.mark.parametrize("count", [1, 3])
def test_a_started_saga_is_written_once_as_it_stands_after_its_first_steps_start(count):
    """A start (`lifecycle.saga_start`, a batch of them `saga_start_many`) creates its sagas in
    memory, starts their first steps, and writes them with their events and first commands in
    one statement (`run.write_runs`, `created`): on PostgreSQL no saga or step row is inserted
    and then updated. What is stored is what the engine decided; a second start of the same
    saga does nothing."""
    ids = sorted(str(uuid.uuid4()) for _ in range(count))
    starts = [(saga_id, "place_order", CONTEXT) for saga_id in ids]
    with CaptureQueriesContext(connections["default"]) as queries:
        assert engine.saga_start_many(starts=starts, contexts=[None] * count) == [True] * count
    writes = [
        q["sql"] for q in queries.captured_queries if '"orchestration_saga' in q["sql"] and "SELECT" not in q["sql"][:7]
    ]
    if connections["default"].vendor == "postgresql":
        assert len(writes) == 1, writes
        assert 'UPDATE "orchestration_saga"' not in writes[0]
        assert 'UPDATE "orchestration_sagastep"' not in writes[0]
    for saga_id in ids:
        saga = Saga.objects.get(id=saga_id)
        steps = {s.name: s for s in SagaStep.objects.filter(saga_id=saga_id)}
        assert saga.state == Saga.State.RUNNING
        assert saga.deadline_at is not None
        assert (steps["reserve_stock"].state, steps["reserve_stock"].attempts) == ("running", 1)
        assert steps["reserve_stock"].deadline_at is not None
        assert {s.state for name, s in steps.items() if name != "reserve_stock"} == {"pending"}
        kinds = list(saga.events.order_by("seq").values_list("kind", flat=True))
        assert kinds == ["saga_created", "saga_started", "step_started"]
        assert saga.version == 3
        assert OutboxMessage.objects.filter(payload__saga_id=saga_id, task="inventory.execute").count() == 1
    assert DefinitionSnapshot.objects.filter(digest=definitions.PLACE_ORDER.digest).count() == 1
    assert engine.saga_start_many(starts=starts, contexts=[None] * count) == [False] * count
    assert SagaStep.objects.filter(saga_id__in=ids).count() == count * len(steps)


def test_a_start_whose_saga_id_is_spelled_otherwise_still_numbers_its_steps():
    """The start message's id may be spelled in capitals (any UUID spelling): the steps the
    start inserts are matched to their database ids all the same."""
    saga_id = uuid.uuid4()
    assert engine.saga_start(saga_id=str(saga_id).upper(), definition="place_order", context=CONTEXT)
    assert Saga.objects.get(id=saga_id).state == Saga.State.RUNNING
    assert SagaStep.objects.filter(saga_id=saga_id).count() == len(definitions.PLACE_ORDER.steps) + len(
        definitions.PLACE_ORDER.on_failure
    )
    assert not engine.saga_start(saga_id=str(saga_id), definition="place_order", context=CONTEXT)
