"""The broker loses everything it holds, at several points of the flow, for every style: queued
messages, unacknowledged ones and the handling window's countdowns. Every order must still end
completed or compensated, and the audit must be clean.

The stack has its own redis-server (tests/stack.py), so wiping it touches no one else."""

from __future__ import annotations

import contextlib
import os
import signal

import pytest
import redis
from django.db import connections

from orchestration.audit import run_audit
from orchestration.models import Saga
from orders.models import Order
from tests.chaos.test_chaos import inject
from tests.conftest import order_body
from tests.processes import wait_for
from tests.stack import PASSWORD, Stack

pytestmark = [pytest.mark.production, pytest.mark.django_db(transaction=True, databases="__all__")]

STYLES = ("orchestrated", "parallel", "tcc", "choreography")
HANDLING_SECONDS = 3
AT_REST = ("completed", "compensated", "failed", "parked", "cancelled")
SERVICES = ("inventory", "payments", "orders", "shipping", "notifications")


@pytest.fixture(scope="module")
def stack(django_db_setup, django_db_blocker):
    running = Stack("broker-loss", step_timeout=3.0, workers=0, concurrency=3)
    running.env["SHIPPING_HANDLING_SECONDS"] = str(HANDLING_SECONDS)  # a window to lose countdowns in
    running.start()
    # The orchestrator (the engine and the choreography's tracker) on a worker of its own, so
    # that the test can hold it back while the services carry on.
    running.start_worker(0, queues=list(SERVICES), wait=False)
    running.start_worker(1, queues=["orchestrator"])
    wait_for(lambda: " ready." in running.log("worker0"), timeout=60, message="worker0 ready")
    yield running
    running.stop()


def flush(stack: Stack) -> None:
    """Lose everything the broker holds, as a restart without persistence would."""
    redis.Redis(port=stack.redis_port).flushall()


def restart(stack: Stack) -> None:
    """A real restart: the workers' connections drop too, and with them the countdowns they held."""
    stack.stop_redis()
    stack.start_redis()


@contextlib.contextmanager
def orchestrator_held(stack: Stack):
    """The orchestrator's worker stops taking messages (as if far behind); the services go on."""
    os.killpg(stack.processes["worker1"].pid, signal.SIGSTOP)
    try:
        yield
    finally:
        os.killpg(stack.processes["worker1"].pid, signal.SIGCONT)


def place(stack: Stack, customer: str, styles=STYLES, tokens=("tok_visa", "tok_declined")) -> list[dict]:
    receipts = []
    for style in styles:
        for token in tokens:
            status, receipt = stack.call(customer, "POST", "/api/orders/", {**order_body(token=token), "mode": style})
            assert status == 202, receipt
            receipts.append({**receipt, "mode": style, "token": token})
    return receipts


def order_statuses(receipts: list[dict]) -> dict[str, str]:
    connections.close_all()
    ids = [r["id"] for r in receipts]
    return {str(i): s for i, s in Order.objects.using("orders").filter(id__in=ids).values_list("id", "status")}


def choreographed(receipts: list[dict]) -> list[dict]:
    return [r for r in receipts if r["mode"] == "choreography"]


def test_every_style_recovers_when_the_broker_loses_what_it_held(stack, django_user_model, catalogue):
    customer = django_user_model.objects.create_user("loss", "loss@example.com", PASSWORD).username
    for service in SERVICES:
        inject(service, latency_ms=60)  # enough to keep messages queued when the broker goes
    receipts = []

    # 1. The tracker has heard nothing yet (the orchestrator is busy) when the broker restarts:
    #    the choreographed orders are approved and waiting out the handling window (a countdown
    #    held by the shipping worker), or already rejected, and no saga exists for them.
    with orchestrator_held(stack):
        wave = place(stack, customer, styles=("orchestrated", "tcc"), tokens=("tok_visa",))
        wave += place(stack, customer, styles=("choreography",), tokens=("tok_visa", "tok_visa", "tok_declined"))
        wait_for(
            lambda: set(order_statuses(choreographed(wave)).values()) == {"approved", "rejected"},
            timeout=20,
            message="the choreographed orders approved (or rejected) with no tracker",
        )
        restart(stack)
    receipts += wave

    # 2. Mid-way: the broker loses what it holds while the flows run, and the tracker hears
    #    only what the services publish afterwards (the end of some flows). A worker that the
    #    restart made exit is started again first, which takes a while on a busy machine.
    with orchestrator_held(stack):
        wave = place(stack, customer)
        wait_for(
            lambda: "approved" in order_statuses(choreographed(wave)).values(),
            timeout=60,
            message="a choreographed order in its handling window",
        )
        flush(stack)
    receipts += wave

    # 3. Right after placing: the start messages and the first events are lost.
    wave = place(stack, customer)
    flush(stack)
    receipts += wave

    def at_rest():
        connections.close_all()
        sagas = {str(s.id): s.state for s in Saga.objects.filter(id__in=[r["saga"]["id"] for r in receipts])}
        return sagas if len(sagas) == len(receipts) and all(s in AT_REST for s in sagas.values()) else None

    with contextlib.suppress(AssertionError):  # the assertion below says which did not
        wait_for(at_rest, timeout=60, interval=0.5, message="every saga to come to rest")
    connections.close_all()
    found = Saga.objects.filter(id__in=[r["saga"]["id"] for r in receipts])
    sagas = {str(s.id): s.state for s in found}
    failures = {str(s.id): (s.failure or {}).get("code") for s in found}
    statuses = order_statuses(receipts)
    expected = {"tok_visa": "completed", "tok_declined": "compensated"}
    wrong = [
        (r["mode"], r["token"], sagas.get(r["saga"]["id"], "no saga"), failures.get(r["saga"]["id"]), statuses[r["id"]])
        for r in receipts
        if sagas.get(r["saga"]["id"]) != expected[r["token"]]
    ]
    assert wrong == [], "\n".join(map(str, wrong))
    assert run_audit() == []
