"""Batches (sagaplatform/kernel/batching.py): a service's commands run as one batch in one
transaction, and their replies are applied as one batch in one more. What a batch must give is
what the same messages one at a time give; a bad message in it fails alone."""

from __future__ import annotations

import uuid

import pytest
from django.db import connections, transaction
from django.test.utils import CaptureQueriesContext

from inventory.models import Reservation
from orchestration import engine
from orchestration.audit import run_audit
from orchestration.models import Saga, SagaEvent, SagaStep
from sagaplatform.celery import app as celery_app
from sagaplatform.kernel import batching, commands, outbox
from sagaplatform.kernel.models import Barrier, DeadLetter, OutboxMessage
from tests.conftest import InTestBroker, mug, order_body, register_tasks

pytestmark = pytest.mark.django_db(transaction=True, databases="__all__")


class BatchingBroker(InTestBroker):
    """Delivers every queued message of a batched task at once, as a worker that took them off
    its queue together would, and applies the replies where they committed, as a worker that
    also consumes the orchestrator's queue does."""

    def __init__(self) -> None:
        super().__init__()
        self.batches: list[int] = []

    def deliver(self, *, limit: int = 1000, skip: tuple[str, ...] = ()) -> int:
        count = 0
        while count < limit and (self.queue or self.release_delayed()):
            first = self.queue[0]
            task = celery_app.tasks[first["task"]]
            if not isinstance(task, batching.Batched):
                self.run(self.queue.pop(0))
                count += 1
                continue
            batch = self.take(first["task"])
            self.delivered.extend(batch)
            self.batches.append(len(batch))
            task.deliver([message["payload"] for message in batch])
            count += len(batch)
        return count


@pytest.fixture
def batching_broker(monkeypatch) -> BatchingBroker:
    register_tasks()
    fake = BatchingBroker()
    monkeypatch.setattr(outbox, "_send", fake.publish)
    monkeypatch.setattr(outbox, "runs_here", lambda message: message.queue == commands.ORCHESTRATOR_QUEUE)
    return fake


def place(api, mode: str = "orchestrated") -> str:
    response = api.post("/api/orders/", {**order_body(), "mode": mode}, format="json")
    assert response.status_code == 202, response.content
    return response.json()["saga"]["id"]


def history(saga_id: str) -> list[tuple[str, str]]:
    return [(e.kind, e.step) for e in SagaEvent.objects.filter(saga_id=saga_id).order_by("seq")]


@pytest.mark.parametrize("mode", ["orchestrated", "parallel", "tcc"])
def test_orders_in_batches_end_as_one_order_alone_does(alice_api, catalogue, batching_broker, mode, settings):
    # Parallel steps always sent meanwhile: once this process has timed them, it would keep the
    # quick ones here for the later orders, and their events would come in another order.
    settings.SAGA_FAN_OUT_AFTER_MS = 0
    alone = place(alice_api, mode)
    batching_broker.deliver()
    assert set(batching_broker.batches) == {1}

    saga_ids = [place(alice_api, mode) for _ in range(4)]
    batching_broker.deliver()

    assert max(batching_broker.batches) == 4  # the four orders' commands ran together
    for saga_id in saga_ids:
        assert Saga.objects.get(id=saga_id).state == Saga.State.COMPLETED
        assert history(saga_id) == history(alone)
    assert run_audit() == []


def test_a_batch_of_commands_is_one_transaction_and_one_insert_of_replies(alice_api, catalogue, batching_broker):
    saga_ids = [place(alice_api) for _ in range(3)]
    starts = batching_broker.take("orchestration.start_saga")
    for message in starts:
        batching_broker.run(message)
    reserves = batching_broker.take("inventory.execute")
    assert len(reserves) == 3

    with (
        CaptureQueriesContext(connections["inventory"]) as queries,
        CaptureQueriesContext(connections["default"]) as engine,
    ):
        outcomes = commands.execute_many(
            service="inventory", commands=[commands.Command.from_message(m["payload"]) for m in reserves]
        )

    assert [o["status"] for o in outcomes] == [commands.SUCCEEDED] * 3
    sql = [q["sql"] for q in queries.captured_queries]
    outbox_inserts = [s for s in sql if f'INSERT INTO "{OutboxMessage._meta.db_table}"' in s]
    assert len(outbox_inserts) == 1  # the three replies in one INSERT
    assert OutboxMessage.objects.using("inventory").filter(task=commands.REPLY_TASK).count() == 3
    barrier_inserts = [s for s in sql if f'INSERT INTO "{Barrier._meta.db_table}"' in s]
    assert len(barrier_inserts) == 1  # the three actions' barrier rows, with their outcomes, in one INSERT
    if connections["inventory"].vendor == "postgresql":
        assert barrier_inserts == outbox_inserts  # both in one statement
    stored = Barrier.objects.using("inventory").filter(step="reserve_stock", op="action")
    assert sorted(str(b.saga_id) for b in stored) == sorted(saga_ids)
    assert {b.outcome["status"] for b in stored} == {commands.SUCCEEDED}
    # ... and they were applied, as one batch, where they committed: each saga moved on.
    for saga_id in saga_ids:
        assert SagaStep.objects.get(saga_id=saga_id, name="reserve_stock").state == "succeeded"
    # The three next commands were written with the sagas: on PostgreSQL in the one statement
    # that writes the batch's sagas, steps and events.
    writes = [q["sql"] for q in engine.captured_queries if f'INSERT INTO "{OutboxMessage._meta.db_table}"' in q["sql"]]
    assert len(writes) == 1
    if connections["default"].vendor == "postgresql":
        assert f'UPDATE "{Saga._meta.db_table}"' in writes[0]
    assert [m["payload"]["step"] for m in batching_broker.take("payments.execute")] == ["charge_payment"] * 3


def three_reserves(api, broker) -> tuple[list[str], list[commands.Command]]:
    """Three orders started; their reserve commands, taken off the queue together."""
    saga_ids = [place(api) for _ in range(3)]
    for message in broker.take("orchestration.start_saga"):
        broker.run(message)
    return saga_ids, [commands.Command.from_message(m["payload"]) for m in broker.take("inventory.execute")]


def test_a_command_that_raises_fails_alone_and_the_rest_of_its_batch_commits(
    alice_api, catalogue, batching_broker, monkeypatch
):
    saga_ids, reserves = three_reserves(alice_api, batching_broker)
    unlucky = reserves[1].saga_id
    real = commands.get_operation("inventory", "reserve")

    def reserve(*, command):
        if command.saga_id == unlucky:
            raise RuntimeError("a bug")
        return real(command=command)

    monkeypatch.setitem(commands._OPERATIONS, ("inventory", "reserve"), reserve)
    outcomes = commands.execute_many(service="inventory", commands=reserves)

    assert [o["status"] for o in outcomes] == [commands.SUCCEEDED, commands.TRANSIENT_ERROR, commands.SUCCEEDED]
    assert outcomes[1]["error"]["message"] == "RuntimeError: a bug"
    barrier = set(Barrier.objects.using("inventory").filter(step="reserve_stock").values_list("saga_id", flat=True))
    assert barrier == {reserves[0].saga_id, reserves[2].saga_id}  # no trace of the failed attempt
    assert Reservation.objects.using("inventory").filter(saga_id=unlucky).count() == 0
    steps = {str(s.saga_id): s.state for s in SagaStep.objects.filter(name="reserve_stock")}
    assert steps == {saga_ids[0]: "succeeded", saga_ids[1]: "retrying", saga_ids[2]: "succeeded"}


def test_a_duplicate_in_a_batch_replays_and_the_rest_of_its_batch_runs_once(alice_api, catalogue, batching_broker):
    """One command of a batch ran before (a redelivery): its barrier row is there, so the batch's
    one INSERT of rows falls short; the batch rolls back and runs again, each command reading its
    row first. The duplicate replays its first outcome, the others run once."""
    saga_ids, reserves = three_reserves(alice_api, batching_broker)
    first = commands.execute_many(service="inventory", commands=[reserves[1]])
    assert first[0]["status"] == commands.SUCCEEDED

    outcomes = commands.execute_many(service="inventory", commands=reserves)

    assert [o["status"] for o in outcomes] == [commands.SUCCEEDED] * 3
    assert outcomes[1] == {**first[0], "replayed": True}
    assert "replayed" not in outcomes[0]
    assert "replayed" not in outcomes[2]
    for saga_id in saga_ids:
        assert Reservation.objects.using("inventory").filter(saga_id=saga_id).count() == 1
        assert Barrier.objects.using("inventory").filter(saga_id=saga_id, step="reserve_stock").count() == 1
    batching_broker.deliver()
    assert {saga.state for saga in Saga.objects.all()} == {"completed"}
    assert run_audit() == []


def test_a_business_failure_in_a_batch_is_stored_without_its_effects_and_the_rest_commit(
    alice_api, catalogue, batching_broker, monkeypatch
):
    """The batch runs its operations with no savepoint each (two round trips fewer per command);
    a business failure rolls it back, and it runs once more with one savepoint per operation, so
    the failure is stored without its partial effects and the others commit, still together."""
    from inventory.exceptions import InsufficientStock

    saga_ids, reserves = three_reserves(alice_api, batching_broker)
    unlucky = reserves[1].saga_id
    real = commands.get_operation("inventory", "reserve")

    def reserve(*, command):
        result = real(command=command)  # its reservation is written ...
        if command.saga_id == unlucky:
            raise InsufficientStock("no more mugs")  # ... then it fails: the write must not stay
        return result

    monkeypatch.setitem(commands._OPERATIONS, ("inventory", "reserve"), reserve)
    with CaptureQueriesContext(connections["inventory"]) as queries:
        outcomes = commands.execute_many(service="inventory", commands=reserves)

    assert [o["status"] for o in outcomes] == [commands.SUCCEEDED, commands.BUSINESS_FAILURE, commands.SUCCEEDED]
    assert outcomes[1]["error"]["code"] == InsufficientStock.code
    assert Reservation.objects.using("inventory").filter(saga_id=unlucky).count() == 0
    stored = Barrier.objects.using("inventory").get(saga_id=unlucky, step="reserve_stock").outcome
    assert stored["status"] == commands.BUSINESS_FAILURE
    savepoints = [q["sql"] for q in queries.captured_queries if q["sql"].startswith("SAVEPOINT")]
    assert savepoints, "the second run takes a savepoint per operation"
    assert len([q for q in queries.captured_queries if "INSERT" in q["sql"] and "outboxmessage" in q["sql"]]) == 1
    steps = {str(s.saga_id): s.state for s in SagaStep.objects.filter(name="reserve_stock")}
    assert steps[saga_ids[0]] == steps[saga_ids[2]] == "succeeded"
    assert steps[saga_ids[1]] != "succeeded"
    batching_broker.deliver()
    states = {str(saga.id): saga.state for saga in Saga.objects.all()}
    assert states == {saga_ids[0]: "completed", saga_ids[1]: "compensated", saga_ids[2]: "completed"}
    assert run_audit() == []


def test_a_command_alone_that_fails_for_business_is_stored_without_its_effects(
    alice_api, catalogue, broker, monkeypatch
):
    from inventory.exceptions import InsufficientStock

    real = commands.get_operation("inventory", "reserve")

    def reserve(*, command):
        real(command=command)  # its reservation is written, then it fails: the write must not stay
        raise InsufficientStock("no more mugs")

    monkeypatch.setitem(commands._OPERATIONS, ("inventory", "reserve"), reserve)
    saga_id = place(alice_api)
    broker.deliver()

    assert Saga.objects.get(id=saga_id).state == Saga.State.COMPENSATED
    stored = Barrier.objects.using("inventory").get(saga_id=saga_id, step="reserve_stock", op="action").outcome
    assert stored["status"] == commands.BUSINESS_FAILURE
    assert Reservation.objects.using("inventory").filter(saga_id=saga_id).count() == 0
    assert mug() == (50, 0)
    assert run_audit() == []


def test_a_reply_that_fails_fails_alone_and_the_others_apply(alice_api, catalogue, broker):
    saga_ids = [place(alice_api) for _ in range(2)]
    for message in broker.take("orchestration.start_saga"):
        broker.run(message)
    for message in broker.take("inventory.execute"):
        broker.run(message)
    replies = [m["payload"] for m in broker.take(commands.REPLY_TASK)]
    bad = {**replies[0], "saga_id": "not-a-saga-id"}

    results = engine.reply_handle_many(replies=[replies[0], bad, replies[1]])

    assert results == [True, None, True]
    for saga_id in saga_ids:
        assert SagaStep.objects.get(saga_id=saga_id, name="reserve_stock").state == "succeeded"
    # Two replies for one saga in one batch apply in turn (a redelivered one is stale).
    assert engine.reply_handle_many(replies=[replies[0], replies[0]]) == [False, False]


def test_replies_committed_together_run_here_as_one_batch_and_a_failed_one_is_sent(batching_broker, monkeypatch):
    seen: list[int] = []

    def runner(messages):
        seen.append(len(messages))
        return [message.payload["n"] != 1 for message in messages]

    monkeypatch.setitem(outbox.BATCH_RUNNERS, commands.REPLY_TASK, runner)

    with outbox.inline_after(), transaction.atomic(using="inventory"):
        outbox.enqueue_many(
            using="inventory",
            messages=[
                outbox.message(task=commands.REPLY_TASK, queue=commands.ORCHESTRATOR_QUEUE, payload={"n": n})
                for n in range(3)
            ],
            inline=True,
        )

    assert seen == [3]  # one run for the three
    published = {m.payload["n"]: m.published_at is not None for m in OutboxMessage.objects.using("inventory")}
    assert published == {0: True, 1: True, 2: True}  # every row marked: two ran here, one was sent
    assert [m["payload"] for m in batching_broker.queue] == [{"n": 1}]


def test_an_unreadable_command_is_a_dead_letter_and_the_rest_of_its_batch_runs(alice_api, catalogue, broker):
    place(alice_api)
    for message in broker.take("orchestration.start_saga"):
        broker.run(message)
    (reserve,) = broker.take("inventory.execute")
    task = celery_app.tasks["inventory.execute"]

    task.run(
        [
            {"id": "m-1", "args": [{"saga_id": str(uuid.uuid4())}], "kwargs": {}, "queue": "inventory", "headers": {}},
            {"id": "m-2", "args": [reserve["payload"]], "kwargs": {}, "queue": "inventory", "headers": {}},
        ]
    )

    letter = DeadLetter.objects.using("inventory").get()
    assert (letter.task, letter.message_id, letter.reason) == ("inventory.execute", "m-1", DeadLetter.Reason.FAILED)
    assert "KeyError" in letter.error
    assert Barrier.objects.using("inventory").filter(saga_id=reserve["payload"]["saga_id"]).count() == 1


def test_starts_in_one_batch_are_one_transaction_and_a_bad_one_fails_alone(alice_api, catalogue, broker):
    saga_ids = [place(alice_api) for _ in range(3)]
    starts = [m["payload"] for m in broker.take("orchestration.start_saga")]
    broker.run({"id": "x", "task": "orchestration.start_saga", "queue": "orchestrator", "payload": starts[0]})
    broker.queue.clear()
    batch = [(s["saga_id"], "place_order", s["context"]) for s in starts]

    with CaptureQueriesContext(connections["default"]) as queries:
        together = engine.saga_start_many(starts=batch[1:] + batch[:1], contexts=[None] * 3)
    assert together == [True, True, False]  # the first one existed already
    # Their first commands are written in the statement that inserts the sagas as they stand
    # once started (PostgreSQL), or in one INSERT of their own.
    writes = [q["sql"] for q in queries if f'INSERT INTO "{OutboxMessage._meta.db_table}"' in q["sql"]]
    assert len(writes) == 1
    if connections["default"].vendor == "postgresql":
        assert f'INSERT INTO "{Saga._meta.db_table}"' in writes[0]
        assert f'UPDATE "{Saga._meta.db_table}"' not in writes[0]
    assert [m["task"] for m in broker.queue] == ["inventory.execute"] * 2  # their first commands

    again = engine.saga_start_many(
        starts=[(str(uuid.uuid4()), "no_such_definition", {}), (saga_ids[1], "place_order", starts[1]["context"])],
        contexts=[None, None],
    )
    assert again == [None, False]  # the unknown definition fails alone; the duplicate does nothing
    assert Saga.objects.filter(id__in=saga_ids).count() == 3
