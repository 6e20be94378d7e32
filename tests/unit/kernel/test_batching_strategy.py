"""How a worker forms batches (`CommandBatch.Strategy`): the consumer buffers a service's commands
and hands them to the pool as one batch when the buffer is full, or once its first message has
waited, unless every pool process is busy with a batch (then as soon as one returns); when the
worker holds next to nothing else, at once. A command
that calls outside the platform goes alone, at once. Each message is acknowledged when its
batch returns, and gets Celery's verdict if the batch's process is lost.

The consumer, its pool and timer, and the requests are stand-ins: what is tested is the
strategy's own bookkeeping (real workers run it in tests/chaos and tests/e2e)."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import pytest

from sagaplatform.celery import app as celery_app
from sagaplatform.kernel import batching
from tests.conftest import register_tasks


class Request:
    made: list[Request] = []

    def __init__(self, message, **kwargs: Any) -> None:
        Request.made.append(self)
        self.id = message.headers["id"]
        self.name = kwargs["task"].name
        self.args = [message.body]
        self.kwargs: dict = {}
        self.argsrepr = self.kwargsrepr = ""
        self.request_dict = {"traceparent": "00-" + "1" * 32 + "-" + "2" * 16 + "-01"}
        self.delivery_info = {"routing_key": kwargs["task"].name.split(".")[0]}
        self.acked = False
        self.failed: Any = None

    def acknowledge(self) -> None:
        self.acked = True

    def on_failure(self, exc_info) -> None:
        self.failed = exc_info


class Pool:
    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.jobs: list[dict] = []

    def apply_async(self, target, args, **callbacks) -> None:
        self.jobs.append({"items": args[1], **callbacks})


class Timer:
    def __init__(self) -> None:
        self.calls: list = []

    def call_after(self, seconds, fun) -> None:
        self.calls.append(fun)

    def fire(self) -> None:
        calls, self.calls = self.calls, []
        for fun in calls:
            fun()


@pytest.fixture
def worker(monkeypatch):
    """A consumer with a pool of four processes; returns (handler of `service`.execute, pool, timer)."""
    register_tasks()
    monkeypatch.setattr(batching, "create_request_cls", lambda *args, **kwargs: Request)
    monkeypatch.setattr(batching, "_IN_FLIGHT", [0])
    monkeypatch.setattr(batching, "_HELD", [0])
    monkeypatch.setattr(batching, "_WAITING", {})
    monkeypatch.setattr(Request, "made", [])
    pool, timer = Pool(limit=4), Timer()
    consumer = SimpleNamespace(pool=pool, timer=timer, hostname="test", event_dispatcher=None, connection_errors=())

    def handler(service: str):
        task = celery_app.tasks[f"{service}.execute"]
        monkeypatch.setattr(task, "_buffer", [])
        monkeypatch.setattr(task, "_armed", False)
        handle = task.Strategy(task, celery_app, consumer)

        def receive(operation: str = "reserve") -> None:
            n = len(Request.made)
            message = SimpleNamespace(payload={}, body={"operation": operation, "n": n}, headers={"id": f"m{n}"})
            handle(message, None, None, None, None)

        return receive

    return handler, pool, timer


def ids(pool: Pool) -> list[list[str]]:
    return [[item["id"] for item in job["items"]] for job in pool.jobs]


def working(handler) -> None:
    """Two shipping commands in the pool: the worker holds more than a lone order's message, so
    what comes next waits for company."""
    shipping = handler("shipping")
    shipping()
    shipping()


def test_a_lone_orders_commands_go_at_once_and_wait_for_company_once_the_worker_holds_more(worker):
    handler, pool, timer = worker
    receive = handler("inventory")
    receive()
    receive()  # the first one's batch has not returned yet (it sent this one): still at once
    assert ids(pool) == [["m0"], ["m1"]]
    assert timer.calls == []

    receive()  # three held: this one waits for company
    receive()
    assert len(pool.jobs) == 2
    timer.fire()
    assert ids(pool) == [["m0"], ["m1"], ["m2", "m3"]]


def test_a_waiting_worker_never_sends_at_once(worker, settings):
    settings.SAGA_BATCH_WAIT_WHEN_IDLE = True
    handler, pool, timer = worker
    receive = handler("inventory")
    receive()
    assert pool.jobs == []
    timer.fire()
    assert ids(pool) == [["m0"]]


def test_while_the_pool_works_commands_wait_for_the_batch_wait_then_go_as_one_batch(worker):
    handler, pool, timer = worker
    working(handler)
    receive = handler("inventory")
    for _ in range(3):
        receive()
    assert len(pool.jobs) == 2  # buffered
    assert len(timer.calls) == 1  # one wait, from the first message

    timer.fire()

    job = pool.jobs[2]
    assert [item["args"][0]["n"] for item in job["items"]] == [2, 3, 4]
    assert [item["id"] for item in job["items"]] == ["m2", "m3", "m4"]
    assert job["items"][0]["headers"]["traceparent"].startswith("00-")  # each message's trace context
    assert job["items"][0]["queue"] == "inventory"


def test_a_full_buffer_goes_at_once(worker, monkeypatch):
    handler, pool, _timer = worker
    monkeypatch.setattr(celery_app.tasks["inventory.execute"], "flush_every", 2)
    working(handler)
    receive = handler("inventory")
    receive()
    receive()
    assert [len(job["items"]) for job in pool.jobs] == [1, 1, 2]


def test_while_every_process_is_busy_the_batch_grows_and_goes_when_one_returns(worker):
    handler, pool, timer = worker
    payments, inventory = handler("payments"), handler("inventory")
    for _ in range(4):  # four gateway calls: every pool process busy
        payments("charge")
    assert len(pool.jobs) == 4

    for _ in range(3):
        inventory()
    timer.fire()  # due, but no process is free: it waits
    inventory()
    assert len(pool.jobs) == 4

    pool.jobs[0]["callback"](None)  # a batch returns

    assert len(pool.jobs) == 5
    assert len(pool.jobs[4]["items"]) == 4  # everything that arrived meanwhile, as one batch


def test_a_command_that_calls_outside_goes_alone_and_at_once(worker):
    handler, pool, timer = worker
    working(handler)
    receive = handler("payments")
    receive("capture")  # no outside call: buffered
    receive("charge")  # calls the card gateway
    operations = [[item["args"][0].get("operation") for item in job["items"]] for job in pool.jobs]
    assert operations == [["reserve"], ["reserve"], ["charge"]]
    timer.fire()
    assert [item["args"][0]["operation"] for item in pool.jobs[3]["items"]] == ["capture"]


def test_each_message_is_acknowledged_when_its_batch_returns_or_gets_celerys_verdict_if_lost(worker):
    handler, pool, timer = worker
    receive = handler("inventory")
    for _ in range(4):
        receive()
    timer.fire()
    first, second, third = pool.jobs
    assert [len(job["items"]) for job in pool.jobs] == [1, 1, 2]
    assert batching._IN_FLIGHT == [3]
    assert not any(request.acked for request in Request.made)  # nothing before its batch ran

    first["callback"](None)
    third["error_callback"]("worker lost")

    returned, running, *lost = Request.made
    assert returned.acked
    assert returned.failed is None
    assert (running.acked, running.failed) == (False, None)
    assert [(request.acked, request.failed) for request in lost] == [(False, "worker lost")] * 2
    assert batching._IN_FLIGHT == [1]  # two processes free again
    assert batching._HELD == [1]
    second["callback"](None)
    assert (batching._IN_FLIGHT, batching._HELD) == ([0], [0])


def test_past_a_burst_of_gateway_calls_no_more_batches_are_handed_over_than_there_are_processes(worker):
    handler, pool, timer = worker
    payments, inventory = handler("payments"), handler("inventory")
    for _ in range(6):
        payments("charge")  # each goes at once, whatever the pool holds: 6 jobs for 4 processes
    inventory()
    timer.fire()
    assert len(pool.jobs) == 6  # the inventory batch waits

    pool.jobs[0]["callback"](None)
    pool.jobs[1]["callback"](None)
    assert len(pool.jobs) == 6  # two still held, all four processes taken
    pool.jobs[2]["callback"](None)
    assert len(pool.jobs) == 7  # one free: the waiting batch goes
    assert batching._IN_FLIGHT == [4]
    timer.fire()  # the busy re-check finds the buffer empty: it stops looking
    assert timer.calls == []
    assert len(pool.jobs) == 7
