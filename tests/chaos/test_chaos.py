"""Faults with real processes: SIGKILLed workers, a crash between commit and publish, Redis
stopped while orders come in, PostgreSQL restarted mid-run, a step that hangs past every
timeout. After each, the sagas finish, effects happen once, and the audit is clean."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from decimal import Decimal

import pytest
from django.db import connections

from inventory.models import Reservation, StockItem
from orchestration.audit import run_audit
from orchestration.models import Saga, SagaEvent, SagaStep
from payments.models import Charge, LedgerEntry
from sagaplatform.kernel import faults
from sagaplatform.kernel.models import Barrier, FaultRule
from shipping.models import Shipment
from tests.conftest import mug, order_body
from tests.processes import wait_for
from tests.stack import PASSWORD, Stack

pytestmark = [pytest.mark.production, pytest.mark.django_db(transaction=True, databases="__all__")]

AT_REST = ("completed", "compensated", "failed", "parked", "cancelled")


@pytest.fixture(scope="module")
def stack(django_db_setup, django_db_blocker):
    running = Stack("main", step_timeout=3.0, concurrency=6).start()
    yield running
    running.stop()


@pytest.fixture
def customer(django_user_model, catalogue):
    return django_user_model.objects.create_user("chaos", "chaos@example.com", PASSWORD).username


def place(stack: Stack, customer: str, **kwargs) -> dict:
    status, receipt = stack.call(customer, "POST", "/api/orders/", order_body(**kwargs))
    assert status == 202, receipt
    return receipt


def settled(saga_ids: list[str], *, timeout: float = 60) -> list[Saga]:
    def done():
        connections.close_all()  # a fresh view, and survive a server restart
        sagas = list(Saga.objects.filter(id__in=saga_ids, state__in=AT_REST))
        return sagas if len(sagas) == len(saga_ids) else None

    return wait_for(done, timeout=timeout, interval=0.25, message=f"{len(saga_ids)} saga(s) to come to rest")


def inject(service: str, **rule) -> FaultRule:
    """Add a rule, then wait out the workers' rule cache so that the next command sees it."""
    created = FaultRule.objects.using(service).create(service=service, **rule)
    time.sleep(faults.CACHE_SECONDS + 0.2)
    return created


def step_state(saga_id: str, name: str) -> str | None:
    step = SagaStep.objects.filter(saga_id=saga_id, name=name).first()
    return step.state if step else None


def assert_paid_once(saga_id: str, amount: Decimal) -> None:
    assert Charge.objects.using("payments").filter(saga_id=saga_id).count() == 1
    entries = list(LedgerEntry.objects.using("payments").filter(charge__saga_id=saga_id).values_list("kind", "amount"))
    assert entries == [("charge", amount)]


@pytest.mark.parametrize("victim", ["pool child", "whole worker"])
def test_worker_killed_mid_step_then_restarted(stack, customer, victim):
    inject("payments", operation="charge", hang_seconds=2.0)
    saga_id = place(stack, customer)["saga"]["id"]
    wait_for(lambda: step_state(saga_id, "charge_payment") == "running", timeout=20, message="the charge to start")
    time.sleep(0.5)  # inside the hang: the charge is being worked on right now

    if victim == "pool child":
        for pid in stack.worker_children():
            os.kill(pid, signal.SIGKILL)  # the main process requeues the message (reject_on_worker_lost)
    else:
        stack.kill("worker0", signal.SIGKILL)  # nothing left to requeue: the lease must notice
        FaultRule.objects.using("payments").all().delete()
        stack.start_worker(0)

    (saga,) = settled([saga_id])
    assert saga.state == "completed"
    assert_paid_once(saga_id, Decimal("25.00"))
    assert mug() == (48, 0)
    assert run_audit() == []


def test_crash_between_local_commit_and_reply_publish(stack, customer):
    rule = inject("inventory", operation="reserve", crash_point="after_commit", crashes_left=1)
    saga_id = place(stack, customer)["saga"]["id"]

    (saga,) = settled([saga_id])

    assert saga.state == "completed"
    rule.refresh_from_db(using="inventory")
    assert rule.crashes_left == 0  # it did crash, once
    assert "crashing at after_commit of inventory.reserve" in stack.log("worker0")
    assert Reservation.objects.using("inventory").filter(saga_id=saga_id).count() == 1
    assert mug() == (48, 0)
    assert_paid_once(saga_id, Decimal("25.00"))
    assert run_audit() == []


def test_redis_stopped_while_orders_are_placed(stack, customer):
    stack.stop_redis()
    started = time.monotonic()
    receipts = [place(stack, customer) for _ in range(5)]  # the API still accepts them
    assert time.monotonic() - started < 15
    time.sleep(1)
    stack.start_redis()  # empty: whatever it held is gone

    sagas = settled([r["saga"]["id"] for r in receipts], timeout=90)

    assert [s.state for s in sagas] == ["completed"] * 5
    assert mug() == (40, 0)
    assert Charge.objects.using("payments").count() == 5
    assert run_audit() == []


def test_postgres_restarted_during_a_run(stack, customer):
    for service in ("inventory", "payments", "orders", "shipping"):
        inject(service, latency_ms=300)
    receipts = [place(stack, customer) for _ in range(4)]
    time.sleep(1.0)  # sagas in flight

    cluster = sorted(os.listdir("/etc/postgresql"))[0]
    subprocess.run(
        ["pg_ctlcluster", "--skip-systemctl-redirect", cluster, "main", "restart", "-m", "fast"],
        check=True,
        capture_output=True,
        timeout=60,
    )
    connections.close_all()
    for service in ("inventory", "payments", "orders", "shipping"):
        FaultRule.objects.using(service).all().delete()

    sagas = settled([r["saga"]["id"] for r in receipts], timeout=120)

    assert [s.state for s in sagas] == ["completed"] * 4
    assert Charge.objects.using("payments").count() == 4
    assert mug() == (42, 0)
    assert run_audit() == []


def test_a_step_that_hangs_times_out_is_retried_then_compensated(stack, customer):
    """Every booking attempt hangs 8 s, far past its 3 s timeout: each attempt times out, the
    saga gives up and compensates. Whatever the hung attempts do when they wake (book, or be
    refused by the barrier because the compensation came first), no shipment is left booked."""
    hang = 8.0
    inject("shipping", operation="schedule", hang_seconds=hang)
    saga_id = place(stack, customer)["saga"]["id"]

    (saga,) = settled([saga_id], timeout=60)

    assert saga.state == "compensated"
    assert saga.failure["code"] == "retries_exhausted"
    events = SagaEvent.objects.filter(saga_id=saga_id, step="schedule_shipment")
    assert events.filter(kind="step_timed_out").count() == 5
    assert Charge.objects.using("payments").get(saga_id=saga_id).state == "refunded"
    assert StockItem.objects.using("inventory").get(sku="SKU-MUG").reserved == 0

    # Let the last hung attempt wake up and finish, then look again.
    last_start = events.filter(kind="retry_scheduled").latest("seq")
    wake = last_start.created_at.timestamp() + last_start.data["delay"] + hang + 2
    time.sleep(max(0.0, wake - time.time()))
    assert not Shipment.objects.using("shipping").filter(saga_id=saga_id, state="scheduled").exists()
    action = Barrier.objects.using("shipping").get(saga_id=saga_id, step="schedule_shipment", op="action")
    booked = action.outcome["status"] == "succeeded"
    # Either the booking ran first and was cancelled, or the compensation ran first and the
    # booking was refused when it woke.
    assert booked == Shipment.objects.using("shipping").filter(saga_id=saga_id, state="cancelled").exists()
    if not booked:
        assert action.outcome["error"]["code"] == "compensated_before_action"
    assert run_audit() == []
