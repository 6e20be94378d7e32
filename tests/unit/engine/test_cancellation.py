"""Cancelling an order: before, during and after each step, racing replies and other cancels."""

from __future__ import annotations

import threading
from decimal import Decimal

import pytest
from django.core import mail
from django.db import connections

from orchestration import sweeper
from orchestration.audit import run_audit
from orchestration.models import Saga, SagaEvent
from orders.models import Order
from payments.models import Charge, LedgerEntry
from shipping.models import Shipment
from tests.conftest import deliver_until, mug, order_body

pytestmark = pytest.mark.django_db(transaction=True, databases="__all__")


def place(api) -> dict:
    response = api.post("/api/orders/", order_body(), format="json")
    assert response.status_code == 202, response.content
    return response.json()


def cancel(api, receipt, reason: str = "changed my mind"):
    return api.post(f"{receipt['url']}cancel/", {"reason": reason}, format="json")


def assert_cancelled_and_undone(receipt) -> None:
    saga = Saga.objects.get(id=receipt["saga"]["id"])
    assert saga.state == "cancelled"
    assert saga.failure["code"] == "cancelled"
    order = Order.objects.using("orders").get(id=receipt["id"])
    assert (order.status, order.failure_code) == ("cancelled", "cancelled")
    assert mug() == (50, 0)
    net = sum(LedgerEntry.objects.using("payments").values_list("amount", flat=True), Decimal("0"))
    assert net == 0
    assert not Shipment.objects.using("shipping").exclude(state="cancelled").exists()
    assert run_audit() == []


def test_cancel_before_the_saga_even_started(alice_api, catalogue, broker):
    receipt = place(alice_api)  # the start message is still queued

    response = cancel(alice_api, receipt)

    assert response.status_code == 202, response.content
    broker.deliver()  # the late start message finds the saga and does nothing
    assert_cancelled_and_undone(receipt)
    assert not Charge.objects.using("payments").exists()
    assert [m.subject for m in mail.outbox] == ["Your order is cancelled"]


def test_cancel_while_a_step_is_in_flight_lets_it_finish_then_undoes_it(alice_api, catalogue, broker):
    receipt = place(alice_api)
    deliver_until(broker, "orders.execute")  # stock reserved, card charged, approval in flight

    response = cancel(alice_api, receipt)
    assert response.status_code == 202
    assert response.json()["saga"]["state"] == "compensating"
    broker.deliver()

    assert_cancelled_and_undone(receipt)
    events = SagaEvent.objects.filter(saga_id=receipt["saga"]["id"])
    # The approval in flight finished, and was then revoked; nothing after it started.
    assert events.filter(kind="step_succeeded", step="approve_order").exists()
    assert events.filter(kind="step_compensated", step="approve_order").exists()
    assert not events.filter(step="schedule_shipment").exists()
    assert Charge.objects.using("payments").get().state == "refunded"
    assert [m.subject for m in mail.outbox] == ["Your order is cancelled"]


def test_cancel_in_the_handling_window_before_dispatch(alice_api, catalogue, broker, settings):
    settings.SHIPPING_HANDLING_SECONDS = 3600
    receipt = place(alice_api)
    broker.deliver()
    saga = Saga.objects.get(id=receipt["saga"]["id"])
    assert saga.steps.get(name="dispatch_shipment").next_attempt_at is not None  # waiting to leave
    assert Shipment.objects.using("shipping").get().state == "scheduled"

    assert cancel(alice_api, receipt).status_code == 202
    broker.deliver()

    assert_cancelled_and_undone(receipt)
    assert Shipment.objects.using("shipping").get().state == "cancelled"
    # The window passing later starts nothing: the saga is no longer running.
    sweeper.sweep_once()
    assert not broker.queue


def test_the_dispatch_starts_when_the_window_has_passed(alice_api, catalogue, broker, settings):
    settings.SHIPPING_HANDLING_SECONDS = 3600
    receipt = place(alice_api)
    broker.deliver()
    saga = Saga.objects.get(id=receipt["saga"]["id"])
    saga.steps.filter(name="dispatch_shipment").update(next_attempt_at="2000-01-01T00:00:00Z")

    assert sweeper.sweep_once()["started"] == 1
    broker.deliver()

    assert Saga.objects.get(id=saga.id).state == "completed"
    assert Shipment.objects.using("shipping").get().state == "dispatched"


def test_cancel_after_dispatch_is_refused_and_changes_nothing(alice_api, catalogue, broker):
    receipt = place(alice_api)
    broker.deliver()

    response = cancel(alice_api, receipt)

    assert response.status_code == 409
    assert response.json()["code"] == "not_cancellable"  # completed: it has shipped
    assert Order.objects.using("orders").get(id=receipt["id"]).status == "shipped"
    assert Charge.objects.using("payments").get().state == "captured"


def test_cancel_while_the_parcel_is_being_dispatched_is_refused(alice_api, catalogue, broker):
    receipt = place(alice_api)
    deliver_until(broker, "shipping.execute")
    broker.run(broker.queue.pop(0))  # schedule
    deliver_until(broker, "shipping.execute")  # the dispatch command is on its way

    response = cancel(alice_api, receipt)

    assert response.status_code == 409
    assert response.json()["code"] == "shipment_in_progress"
    broker.deliver()
    assert Saga.objects.get(id=receipt["saga"]["id"]).state == "completed"


def test_cancel_after_dispatch_but_before_the_saga_finished_is_refused(alice_api, catalogue, broker):
    receipt = place(alice_api)
    deliver_until(broker, "notifications.execute")  # dispatched; the last steps still running

    response = cancel(alice_api, receipt)

    assert response.status_code == 409
    assert response.json()["code"] == "already_shipped"


def test_a_second_cancel_is_refused(alice_api, catalogue, broker):
    receipt = place(alice_api)
    deliver_until(broker, "payments.execute")
    assert cancel(alice_api, receipt).status_code == 202

    again = cancel(alice_api, receipt)

    assert again.status_code == 409
    assert again.json()["code"] == "already_cancelled"
    broker.deliver()
    assert_cancelled_and_undone(receipt)
    assert SagaEvent.objects.filter(saga_id=receipt["saga"]["id"], kind="saga_cancel_requested").count() == 1


def test_a_failed_order_cannot_be_cancelled(alice_api, catalogue, broker):
    response = alice_api.post("/api/orders/", order_body(token="tok_declined"), format="json")
    receipt = response.json()
    broker.deliver()

    refused = cancel(alice_api, receipt)

    assert refused.status_code == 409
    assert refused.json()["code"] == "not_cancellable"
    assert Order.objects.using("orders").get(id=receipt["id"]).status == "rejected"


def test_only_the_customer_may_cancel_their_order(alice_api, bob_api, catalogue, broker):
    from rest_framework.test import APIClient

    receipt = place(alice_api)
    deliver_until(broker, "payments.execute")

    assert cancel(bob_api, receipt).status_code == 404
    assert APIClient().post(f"{receipt['url']}cancel/", {}, format="json").status_code == 401
    broker.deliver()
    assert Saga.objects.get(id=receipt["saga"]["id"]).state == "completed"


@pytest.mark.postgres
def test_concurrent_cancels_cancel_once(alice, catalogue, broker):
    from rest_framework.test import APIClient

    api = APIClient()
    api.force_authenticate(alice)
    receipt = place(api)
    deliver_until(broker, "payments.execute")
    start = threading.Barrier(6)
    codes: list[int] = []

    def attempt() -> None:
        client = APIClient()
        client.force_authenticate(alice)
        try:
            start.wait()
            codes.append(cancel(client, receipt).status_code)
        finally:
            connections.close_all()

    threads = [threading.Thread(target=attempt) for _ in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    broker.deliver()

    assert sorted(codes) == [202, 409, 409, 409, 409, 409]
    assert_cancelled_and_undone(receipt)
    assert SagaEvent.objects.filter(saga_id=receipt["saga"]["id"], kind="saga_cancel_requested").count() == 1


def test_a_cancel_that_loses_the_race_with_the_start_still_cancels(alice_api, catalogue, broker, monkeypatch):
    """The saga is not there when the cancel looks, but its start message is processed before
    the cancel can create it: the cancel must then apply to the saga that now runs."""
    from orchestration.engine import lifecycle

    receipt = place(alice_api)
    real_start = lifecycle.saga_start

    def start_wins_first(**kwargs):
        if kwargs.get("cancel"):
            broker.run(broker.take("orchestration.start_saga")[0])  # the worker got there first
        return real_start(**kwargs)

    monkeypatch.setattr(lifecycle, "saga_start", start_wins_first)
    response = cancel(alice_api, receipt)
    monkeypatch.setattr(lifecycle, "saga_start", real_start)

    assert response.status_code == 202
    assert response.json()["saga"]["state"] == "compensating"
    broker.deliver()
    assert_cancelled_and_undone(receipt)
