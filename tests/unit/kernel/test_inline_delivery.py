"""Inline delivery (kernel/outbox.py, `runs_here`/`run_inline`): a worker that commits a
service's reply, and consumes the orchestrator's queue too, applies the reply itself right after
the commit instead of a Celery hop. Anywhere else (the web process, a test's direct call, a
worker of one service only) the reply goes through the broker as before, and so does a reply
whose inline run failed."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import pytest
from celery._state import _task_stack

from orchestration.models import Saga, SagaStep
from sagaplatform.celery import app as celery_app
from sagaplatform.kernel import outbox
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


def test_a_worker_of_every_queue_applies_its_reply_itself(alice_api, catalogue, broker, monkeypatch):
    saga_id, command = first_command(alice_api, broker)

    with worker_task(monkeypatch, "inventory.execute", EVERY_QUEUE):
        broker.run(command)

    # The reply was applied at once: the saga moved on, and no reply went through the broker.
    assert SagaStep.objects.get(saga_id=saga_id, name="reserve_stock").state == SagaStep.State.SUCCEEDED
    assert [m["task"] for m in broker.queue] == ["payments.execute"]
    [row] = reply_rows(saga_id)
    assert row.published_at is not None  # the relay will not send it again
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
