"""Inline delivery (kernel/outbox.py, `runs_here`/`run_inline`): a worker that commits a
service's reply, and consumes the orchestrator's queue too, applies the reply itself right after
the commit instead of a Celery hop. Anywhere else (the web process, a test's direct call, a
worker of one service only) the reply goes through the broker as before, and so does a reply
whose inline run failed."""

from __future__ import annotations

import contextlib
import inspect
import itertools
import time
import types
from collections.abc import Iterator

import pytest
from celery._state import _task_stack

from orchestration.models import Saga, SagaStep
from sagaplatform.celery import app as celery_app
from sagaplatform.kernel import commands, outbox
from sagaplatform.kernel.commands import REPLY_TASK
from sagaplatform.kernel.models import OutboxMessage
from tests.conftest import deliver_until, order_body, register_tasks

pytestmark = pytest.mark.django_db(transaction=True, databases="__all__")

EVERY_QUEUE = ("orchestrator", "orders", "inventory", "payments", "shipping", "notifications")


@contextlib.contextmanager
def worker_task(monkeypatch, task: str, queues: tuple[str, ...]) -> Iterator[None]:
    """Run the body as `task` does in a worker consuming `queues` (a request off the broker)."""
    running = celery_app.tasks[task]
    monkeypatch.setattr(celery_app.amqp.queues, "_consume_from", dict.fromkeys(queues))
    running.push_request(id="in-worker", called_directly=False, is_eager=False)
    _task_stack.push(running)
    try:
        yield
    finally:
        _task_stack.pop()
        running.pop_request()


def first_command(api, broker) -> tuple[str, dict]:
    """Place an order and start its saga; returns the saga id and the queued reserve command."""
    receipt = api.post("/api/orders/", order_body(), format="json").json()
    deliver_until(broker, "inventory.execute")
    [command] = broker.take("inventory.execute")
    return receipt["saga"]["id"], command


def reply_rows(saga_id: str) -> list[OutboxMessage]:
    return [
        m for m in OutboxMessage.objects.using("inventory").filter(task=REPLY_TASK) if m.payload["saga_id"] == saga_id
    ]


def test_runs_here_only_in_a_worker_task_that_consumes_the_queue(monkeypatch):
    register_tasks()
    message = OutboxMessage(task=REPLY_TASK, queue="orchestrator", payload={})
    assert not outbox.runs_here(message)  # no task: the web process, a test's direct call
    with worker_task(monkeypatch, "inventory.execute", EVERY_QUEUE):
        assert outbox.runs_here(message)
        assert not outbox.runs_here(OutboxMessage(task="no.such_task", queue="orchestrator", payload={}))
    with worker_task(monkeypatch, "inventory.execute", ("inventory",)):
        assert not outbox.runs_here(message)  # a worker of one service's queue only


def test_runs_here_is_off_with_the_setting(monkeypatch, settings):
    register_tasks()
    settings.SAGA_INLINE_DELIVERY = False
    with worker_task(monkeypatch, "inventory.execute", EVERY_QUEUE):
        assert not outbox.runs_here(OutboxMessage(task=REPLY_TASK, queue="orchestrator", payload={}))


def test_a_worker_of_every_queue_carries_the_saga_through_itself(alice_api, catalogue, broker, monkeypatch):
    saga_id, command = first_command(alice_api, broker)

    with worker_task(monkeypatch, "inventory.execute", EVERY_QUEUE):
        broker.run(command)

    # The reply was applied at once, the commands it sent were run at once, their replies too, and
    # so on: no message went through the broker until the last three steps, which run in
    # parallel. One of them ran here; the other two were published, to run meanwhile elsewhere.
    steps = dict(SagaStep.objects.filter(saga_id=saga_id).values_list("name", "state"))
    assert steps["dispatch_shipment"] == steps["commit_stock"] == SagaStep.State.SUCCEEDED
    assert sorted(m["task"] for m in broker.queue) == ["notifications.execute", "orders.execute"]
    broker.deliver()
    assert Saga.objects.get(id=saga_id).state == Saga.State.COMPLETED
    # Every row is marked published, those that ran here too: the relay will not send it again.
    replies = reply_rows(saga_id)
    commands_sent = [m for m in OutboxMessage.objects.using("default") if m.payload.get("saga_id") == saga_id]
    assert len(replies) == 2  # reserve_stock, commit_stock
    assert len(commands_sent) == 8
    assert all(row.published_at is not None for row in [*replies, *commands_sent])


def test_parallel_steps_run_meanwhile_in_other_processes(alice_api, catalogue, broker, monkeypatch):
    """A saga's commands to several services in one round are parallel steps: one runs here and
    the others are published before it runs, for other processes to run at the same time."""
    receipt = alice_api.post("/api/orders/", {**order_body(), "mode": "parallel"}, format="json").json()
    [start] = broker.take("orchestration.start_saga")
    broker.deliver()  # the card's registration
    ran: list[str] = []
    execute_many = commands.execute_many

    def measured(*, service, commands, contexts=None):
        ran.append(service)
        return execute_many(service=service, commands=commands, contexts=contexts)

    monkeypatch.setattr(commands, "execute_many", measured)
    with worker_task(monkeypatch, "orchestration.start_saga", EVERY_QUEUE):
        celery_app.tasks["orchestration.start_saga"].deliver([start["payload"]])

    saga_id = receipt["saga"]["id"]
    steps = dict(SagaStep.objects.filter(saga_id=saga_id).values_list("name", "state"))
    # reserve_stock and charge_payment start together: the stock's ran here, the charge was sent.
    assert ran == ["inventory"]
    assert steps["reserve_stock"] == SagaStep.State.SUCCEEDED
    assert steps["charge_payment"] == SagaStep.State.RUNNING
    assert [m["task"] for m in broker.queue] == ["payments.execute"]
    broker.deliver()
    assert Saga.objects.get(id=saga_id).state == Saga.State.COMPLETED


def test_parallel_steps_quicker_than_a_hop_run_here_once_the_worker_knows_them(
    alice_api, catalogue, broker, monkeypatch, settings
):
    """A worker learns how long each operation takes. Once it knows the last three steps are
    quick, it runs them itself, one after another: the second order sends nothing through the
    broker, and the three replies are applied together."""
    from orchestration.engine import replies

    settings.SAGA_FAN_OUT_AFTER_MS = 60_000  # whatever this machine's speed, these count as quick
    saga_id, command = first_command(alice_api, broker)
    with worker_task(monkeypatch, "inventory.execute", EVERY_QUEUE):
        broker.run(command)
    # The first order: commit_stock's time was not known yet, so the other two went meanwhile.
    assert sorted(m["task"] for m in broker.queue) == ["notifications.execute", "orders.execute"]
    broker.deliver()  # run here, in this process: now it knows them too
    assert Saga.objects.get(id=saga_id).state == Saga.State.COMPLETED
    assert commands.expected_ms("orders", "ship") is not None

    batches: list[int] = []
    locked_many = replies.locked_many

    def measured(items, **kwargs):
        batches.append(len(items))
        return locked_many(items, **kwargs)

    monkeypatch.setattr(replies, "locked_many", measured)
    saga_id, command = first_command(alice_api, broker)
    with worker_task(monkeypatch, "inventory.execute", EVERY_QUEUE):
        broker.run(command)

    assert broker.queue == []
    assert Saga.objects.get(id=saga_id).state == Saga.State.COMPLETED
    assert batches[-1] == 3, batches  # commit_stock's, mark_shipped's and notify_customer's replies


@pytest.mark.parametrize(
    ("costs", "limit", "published"),
    [
        ([3.0, 3.0, 3.0], 10.0, []),  # 0 then 3 then 6 ms ahead of each: all here
        ([8.0, 4.0, 4.0], 10.0, ["c"]),  # 12 ms ahead of the third: it goes meanwhile
        ([None, 1.0, 1.0], 10.0, ["b", "c"]),  # the first's time unknown: counts as long
        ([1.0, None, 1.0], 10.0, ["c"]),
        ([1.0, 1.0, 1.0], 0.0, ["b", "c"]),  # 0: every parallel step but one goes meanwhile
    ],
)
def test_a_parallel_step_goes_meanwhile_only_behind_work_expected_to_take_long(
    monkeypatch, settings, costs, limit, published
):
    settings.SAGA_FAN_OUT_AFTER_MS = limit
    cost = dict(zip("abc", costs, strict=True))
    monkeypatch.setitem(outbox.FAN_OUT_KEYS, "test.execute", lambda message: message.payload["saga_id"])
    monkeypatch.setitem(outbox.RUN_MS, "test.execute", lambda message: cost[message.payload["step"]])
    sent: list[str] = []
    monkeypatch.setattr(outbox, "publish", lambda *, using, messages: sent.extend(m.payload["step"] for m in messages))
    steps = {
        step: OutboxMessage(task="test.execute", queue=f"q{i}", payload={"saga_id": "s1", "step": step})
        for i, step in enumerate("abc")
    }
    other_saga = OutboxMessage(task="test.execute", queue="q0", payload={"saga_id": "s2", "step": "b"})
    # One saga's commands to three queues, and another saga's to the first: its own key.
    groups = outbox._grouped(
        [("default", steps["a"]), ("other", other_saga), ("default", steps["b"]), ("default", steps["c"])]
    )

    left = outbox._fanned_out(groups)

    assert sent == published
    kept = [m.payload["step"] for _task, items in left for _using, m in items if m.payload["saga_id"] == "s1"]
    assert kept == [step for step in "abc" if step not in published]
    assert left[0][1] == [("default", steps["a"]), ("other", other_saga)]


def test_a_drain_runs_round_after_round_not_nested(alice_api, catalogue, broker, monkeypatch):
    """Each run's messages are queued and run by the loop that ran it: a saga's eight commands
    run at one stack depth, not one call deeper per step."""
    saga_id, command = first_command(alice_api, broker)
    depths: list[int] = []
    execute_many = commands.execute_many

    def measured(**kwargs):
        depths.append(len(inspect.stack(0)))
        return execute_many(**kwargs)

    monkeypatch.setattr(commands, "execute_many", measured)
    with worker_task(monkeypatch, "inventory.execute", EVERY_QUEUE):
        broker.run(command)

    # The first command (off the broker), then the drain's rounds to the last steps.
    assert SagaStep.objects.get(saga_id=saga_id, name="commit_stock").state == SagaStep.State.SUCCEEDED
    assert len(depths) >= 6
    assert len(set(depths[1:])) == 1, depths


def test_a_round_runs_what_several_sagas_sent_as_one_batch(alice_api, catalogue, broker, monkeypatch):
    """Two sagas started in one batch: each round of the drain runs both sagas' commands to a
    service as one batch (one transaction), step after step."""
    for _ in range(2):
        assert alice_api.post("/api/orders/", order_body(), format="json").status_code == 202
    starts = broker.take("orchestration.start_saga")
    broker.deliver()  # the cards' registrations
    sizes: list[tuple[str, int]] = []
    execute_many = commands.execute_many

    def measured(*, service, commands, contexts=None):
        sizes.append((service, len(commands)))
        return execute_many(service=service, commands=commands, contexts=contexts)

    monkeypatch.setattr(commands, "execute_many", measured)
    with worker_task(monkeypatch, "orchestration.start_saga", EVERY_QUEUE):
        celery_app.tasks["orchestration.start_saga"].deliver([m["payload"] for m in starts])

    # Both sagas reached their last three steps (parallel: one service's ran here, the other
    # two were published), every round one batch for both.
    assert sizes[:2] == [("inventory", 2), ("payments", 2)]  # reserve_stock, then charge_payment
    assert all(size == 2 for _service, size in sizes), sizes
    assert sorted(m["task"] for m in broker.queue) == ["notifications.execute"] * 2 + ["orders.execute"] * 2
    broker.deliver()
    assert Saga.objects.filter(state=Saga.State.COMPLETED).count() == 2


def test_a_charge_whose_card_is_not_registered_yet_goes_through_the_queue(alice_api, catalogue, broker, monkeypatch):
    """The card's registration travels in a message of its own: a charge that reaches the drain
    before it is sent through the payments queue, behind it, rather than failing and waiting out
    a retry's backoff."""
    receipt = alice_api.post("/api/orders/", order_body(), format="json").json()
    saga_id = receipt["saga"]["id"]
    registration = broker.take("payments.register_payment_method")
    deliver_until(broker, "inventory.execute")
    [command] = broker.take("inventory.execute")

    with worker_task(monkeypatch, "inventory.execute", EVERY_QUEUE):
        broker.run(command)

    charge = SagaStep.objects.get(saga_id=saga_id, name="charge_payment")
    assert (charge.state, charge.attempts) == (SagaStep.State.RUNNING, 1)
    assert [m["task"] for m in broker.queue] == ["payments.execute"]
    broker.queue[:0] = registration  # it was queued first
    broker.deliver()
    assert Saga.objects.get(id=saga_id).state == Saga.State.COMPLETED
    assert SagaStep.objects.get(saga_id=saga_id, name="charge_payment").attempts == 1


def test_past_its_budget_a_drain_publishes_what_is_left(alice_api, catalogue, broker, monkeypatch, settings):
    settings.SAGA_INLINE_BUDGET_MS = 1500
    saga_id, command = first_command(alice_api, broker)
    ticks = itertools.count()  # each reading of the clock is a second later
    monkeypatch.setattr(outbox, "time", types.SimpleNamespace(monotonic=lambda: float(next(ticks))))

    with worker_task(monkeypatch, "inventory.execute", EVERY_QUEUE):
        broker.run(command)

    # The first round (the reply) ran within the budget; the second (the charge) did not run.
    assert SagaStep.objects.get(saga_id=saga_id, name="reserve_stock").state == SagaStep.State.SUCCEEDED
    assert [m["task"] for m in broker.queue] == ["payments.execute"]
    monkeypatch.setattr(outbox, "time", time)
    broker.deliver()
    assert Saga.objects.get(id=saga_id).state == Saga.State.COMPLETED


def test_a_worker_of_one_queue_sends_its_reply_through_the_broker(alice_api, catalogue, broker, monkeypatch):
    saga_id, command = first_command(alice_api, broker)

    with worker_task(monkeypatch, "inventory.execute", ("inventory",)):
        broker.run(command)

    assert [m["task"] for m in broker.queue] == [REPLY_TASK]
    assert SagaStep.objects.get(saga_id=saga_id, name="reserve_stock").state == SagaStep.State.RUNNING
    broker.deliver()
    assert Saga.objects.get(id=saga_id).state == Saga.State.COMPLETED


def test_a_reply_whose_inline_run_fails_goes_through_the_broker(alice_api, catalogue, broker, monkeypatch):
    from orchestration import engine

    saga_id, command = first_command(alice_api, broker)

    def broken(**kwargs):
        raise RuntimeError("the orchestrator's database is busy")

    with monkeypatch.context() as patched:
        patched.setattr(engine, "reply_handle", broken)
        with worker_task(patched, "inventory.execute", EVERY_QUEUE):
            broker.run(command)

    assert [m["task"] for m in broker.queue] == [REPLY_TASK]  # published as if never inlined
    assert SagaStep.objects.get(saga_id=saga_id, name="reserve_stock").state == SagaStep.State.RUNNING
    broker.deliver()
    assert Saga.objects.get(id=saga_id).state == Saga.State.COMPLETED


def test_a_block_left_on_an_error_publishes_what_it_committed(alice_api, catalogue, broker, monkeypatch):
    """A task leaving on an error (a time limit) runs nothing more: its committed reply goes
    through the broker."""
    from django.db import transaction

    saga_id, _command = first_command(alice_api, broker)
    reply = {"saga_id": saga_id, "step": "reserve_stock", "op": "action", "attempt": 1, "status": "succeeded"}

    def commit_then_fail() -> None:
        with outbox.inline_after():
            with transaction.atomic(using="inventory"):
                outbox.enqueue(using="inventory", task=REPLY_TASK, queue="orchestrator", payload=reply, inline=True)
            raise TimeoutError("soft time limit")

    with worker_task(monkeypatch, "inventory.execute", EVERY_QUEUE), pytest.raises(TimeoutError):
        commit_then_fail()

    assert [m["task"] for m in broker.queue] == [REPLY_TASK]
    assert SagaStep.objects.get(saga_id=saga_id, name="reserve_stock").state == SagaStep.State.RUNNING


@pytest.mark.skipif(not celery_app.conf.broker_url.startswith("redis://"), reason="the Redis transport's publish batch")
def test_messages_committed_together_reach_the_broker_in_one_round_trip(monkeypatch):
    """The undelayed messages of one transaction are sent with one Redis pipeline (kombu's
    publish batch), not one LPUSH each; each is still its own message on its queue, and marked
    published."""
    import redis
    from django.db import transaction

    queue = "test-publish-batch"
    client = redis.Redis.from_url(celery_app.conf.broker_url)
    client.delete(queue)
    calls: list[str] = []
    execute_command, execute_pipeline = redis.Redis.execute_command, redis.client.Pipeline.execute

    def command(self, *args, **options):
        calls.append(str(args[0]))
        return execute_command(self, *args, **options)

    def pipeline(self, *args, **kwargs):
        calls.append("pipeline:" + ",".join(str(c[0][0]) for c in self.command_stack))
        return execute_pipeline(self, *args, **kwargs)

    monkeypatch.setattr(redis.Redis, "execute_command", command)
    monkeypatch.setattr(redis.client.Pipeline, "execute", pipeline)
    try:
        with transaction.atomic(using="default"):
            rows = outbox.enqueue_many(
                using="default",
                messages=[outbox.message(task="kernel.test_noop", queue=queue, payload={"n": n}) for n in range(3)],
            )
        assert "pipeline:LPUSH,LPUSH,LPUSH" in calls
        assert "LPUSH" not in calls
        assert client.llen(queue) == 3
        published = OutboxMessage.objects.filter(id__in=[r.id for r in rows], published_at__isnull=False).count()
        assert published == 3
    finally:
        client.delete(queue)
