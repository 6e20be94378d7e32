"""The place_order saga through the API, with messages delivered by the in-test broker."""

from __future__ import annotations

from decimal import Decimal

import pytest
from django.core import mail

from inventory.models import Reservation, StockItem
from notifications.models import Notification
from orchestration.models import Saga, SagaEvent, SagaStep
from orders.models import Order, OrderStatusChange
from payments.models import Charge, LedgerEntry
from shipping.models import Shipment
from tests.conftest import order_body

pytestmark = pytest.mark.django_db(transaction=True, databases="__all__")


def place(api, body) -> dict:
    response = api.post("/api/orders/", body, format="json")
    assert response.status_code == 202, response.content
    return response.json()


def stock(sku: str) -> StockItem:
    return StockItem.objects.using("inventory").get(sku=sku)


def event_kinds(saga_id) -> list[tuple[str, str]]:
    return [(e.kind, e.step) for e in SagaEvent.objects.filter(saga_id=saga_id).order_by("seq")]


def test_happy_path_completes_in_every_service(alice_api, catalogue, broker):
    receipt = place(
        alice_api, order_body(items=[{"sku": "SKU-MUG", "quantity": 2}, {"sku": "SKU-BOOK", "quantity": 1}])
    )
    assert receipt["status"] == "pending"

    broker.deliver()

    saga = Saga.objects.get(id=receipt["saga"]["id"])
    assert saga.state == Saga.State.COMPLETED
    assert set(saga.steps.filter(kind="action").values_list("state", flat=True)) == {"succeeded"}
    order = Order.objects.using("orders").get(id=receipt["id"])
    assert order.status == Order.Status.SHIPPED
    assert order.total == Decimal("69.00")
    # Dispatched: the held units left the warehouse for good.
    assert (stock("SKU-MUG").on_hand, stock("SKU-MUG").reserved) == (48, 0)
    assert (stock("SKU-BOOK").on_hand, stock("SKU-BOOK").reserved) == (19, 0)
    assert Reservation.objects.using("inventory").filter(saga_id=saga.id, state="committed").count() == 2
    charge = Charge.objects.using("payments").get(saga_id=saga.id)
    assert charge.amount == Decimal("69.00")
    assert charge.state == Charge.State.CAPTURED
    assert list(LedgerEntry.objects.using("payments").values_list("kind", "amount")) == [("charge", Decimal("69.00"))]
    assert Shipment.objects.using("shipping").get(saga_id=saga.id).state == Shipment.State.DISPATCHED
    assert Notification.objects.using("notifications").get(order_id=order.id).state == Notification.State.SENT
    assert [m.subject for m in mail.outbox] == ["Your order is on its way"]
    assert [kind for kind, _ in event_kinds(saga.id)][-1] == "saga_completed"


def test_order_detail_shows_saga_progress(alice_api, catalogue, broker):
    receipt = place(alice_api, order_body())
    pending = alice_api.get(receipt["url"]).json()
    assert pending["status"] == "pending"
    assert pending["saga"]["state"] == "pending"

    broker.deliver()

    detail = alice_api.get(receipt["url"]).json()
    assert detail["status"] == "shipped"
    assert detail["failure"] is None
    assert detail["saga"]["state"] == "completed"
    assert [s["name"] for s in detail["saga"]["steps"] if s["kind"] == "action"] == [
        "reserve_stock",
        "charge_payment",
        "approve_order",
        "schedule_shipment",
        "dispatch_shipment",
        "commit_stock",
        "mark_shipped",
        "notify_customer",
    ]
    assert all(s["attempts"] == 1 for s in detail["saga"]["steps"] if s["kind"] == "action")


def test_declined_payment_compensates_the_reservation(alice_api, catalogue, broker):
    before = stock("SKU-LAMP")
    receipt = place(alice_api, order_body(token="tok_declined", items=[{"sku": "SKU-LAMP", "quantity": 3}]))

    broker.deliver()

    saga = Saga.objects.get(id=receipt["saga"]["id"])
    assert saga.state == Saga.State.COMPENSATED
    assert saga.deadline_at is None  # ended: nothing left to expire
    after = stock("SKU-LAMP")
    assert (after.on_hand, after.reserved) == (before.on_hand, before.reserved)
    assert after.version == before.version + 2  # reserved, then released
    assert Reservation.objects.using("inventory").get(saga_id=saga.id).state == Reservation.State.RELEASED
    assert Charge.objects.using("payments").get().state == Charge.State.DECLINED  # the refusal, no money
    assert not LedgerEntry.objects.using("payments").exists()
    assert not Shipment.objects.using("shipping").exists()

    detail = alice_api.get(receipt["url"]).json()
    assert detail["status"] == "rejected"
    assert detail["failure"] == {"code": "card_declined", "message": "The card was declined"}
    steps = {s["name"]: s["state"] for s in detail["saga"]["steps"]}
    assert steps == {
        "reserve_stock": "compensated",
        "charge_payment": "failed",
        "approve_order": "pending",
        "schedule_shipment": "pending",
        "dispatch_shipment": "pending",
        "commit_stock": "pending",
        "mark_shipped": "pending",
        "notify_customer": "pending",
        "reject_order": "succeeded",
        "notify_failure": "succeeded",
    }
    assert [m.subject for m in mail.outbox] == ["Your order could not be completed"]
    assert "The card was declined" in mail.outbox[0].body


def test_compensations_run_in_reverse_order(alice_api, catalogue, broker, monkeypatch):
    """Shipping fails for good: order approval, payment and reservation are undone, last first."""
    from shipping import services as shipping_services
    from shipping.handlers import schedule  # noqa: F401  (the operation is looked up by name)

    def refuse(**kwargs):
        from sagaplatform.kernel.errors import BusinessError

        raise BusinessError("No carrier serves this address", code="address_unserviceable")

    monkeypatch.setattr(shipping_services, "shipment_schedule", refuse)
    receipt = place(alice_api, order_body())

    broker.deliver()

    kinds = [(k, s) for k, s in event_kinds(receipt["saga"]["id"]) if k in ("compensation_started", "step_compensated")]
    assert kinds == [
        ("compensation_started", "approve_order"),
        ("step_compensated", "approve_order"),
        ("compensation_started", "charge_payment"),
        ("step_compensated", "charge_payment"),
        ("compensation_started", "reserve_stock"),
        ("step_compensated", "reserve_stock"),
    ]
    saga_id = receipt["saga"]["id"]
    assert Charge.objects.using("payments").get(saga_id=saga_id).state == Charge.State.REFUNDED
    ledger = LedgerEntry.objects.using("payments").filter(charge__saga_id=saga_id)
    assert sum(entry.amount for entry in ledger) == Decimal("0.00")
    assert stock("SKU-MUG").reserved == 0
    order = Order.objects.using("orders").get(id=receipt["id"])
    assert order.status == Order.Status.REJECTED
    assert order.failure_code == "address_unserviceable"
    history = list(OrderStatusChange.objects.using("orders").filter(order=order).values_list("to_status", flat=True))
    assert history == ["pending", "approved", "pending", "rejected"]


def test_transient_failures_are_retried_with_backoff_then_succeed(alice_api, catalogue, broker):
    receipt = place(alice_api, order_body(token="tok_flaky_2"))

    broker.deliver()

    saga = Saga.objects.get(id=receipt["saga"]["id"])
    assert saga.state == Saga.State.COMPLETED
    charge = SagaStep.objects.get(saga=saga, name="charge_payment")
    assert charge.attempts == 3
    retries = SagaEvent.objects.filter(saga=saga, kind="retry_scheduled").order_by("seq")
    assert [e.data["attempt"] for e in retries] == [1, 2]
    assert all(e.data["error"]["code"] == "gateway_unavailable" for e in retries)
    # Full jitter: each delay is drawn below a ceiling that doubles (0.5 s, then 1 s).
    assert [0 <= e.data["delay"] <= 0.5 * 2**i for i, e in enumerate(retries)] == [True, True]
    assert Charge.objects.using("payments").filter(saga_id=saga.id).count() == 1


def test_retries_exhausted_compensates_and_reports(alice_api, catalogue, broker):
    receipt = place(alice_api, order_body(token="tok_flaky_99"))

    broker.deliver()

    saga = Saga.objects.get(id=receipt["saga"]["id"])
    assert saga.state == Saga.State.COMPENSATED
    step = SagaStep.objects.get(saga=saga, name="charge_payment")
    assert step.attempts == 5  # the default policy's max_attempts
    # The last attempt's fate is unknown to the orchestrator, so the step is compensated too;
    # the barrier turns that into a no-op because no attempt ever committed.
    assert step.state == SagaStep.State.COMPENSATED
    compensated = SagaEvent.objects.get(saga=saga, kind="step_compensated", step="charge_payment")
    assert compensated.data["null_compensation"] is True
    # Every call was answered "unavailable", so nothing could have been taken: the intent is
    # cancelled without another call, and no money moved.
    assert Charge.objects.using("payments").get().state == Charge.State.CANCELLED
    assert not LedgerEntry.objects.using("payments").exists()
    order = Order.objects.using("orders").get(id=receipt["id"])
    assert order.failure_code == "retries_exhausted"
    assert "after 5 attempt(s)" in order.failure_message
    assert stock("SKU-MUG").reserved == 0


def test_insufficient_stock_rejects_without_charging(alice_api, catalogue, broker):
    receipt = place(alice_api, order_body(items=[{"sku": "SKU-LAMP", "quantity": 11}]))

    broker.deliver()

    assert Saga.objects.get(id=receipt["saga"]["id"]).state == Saga.State.COMPENSATED
    assert Order.objects.using("orders").get(id=receipt["id"]).failure_code == "insufficient_stock"
    assert not Charge.objects.using("payments").exists()
    assert stock("SKU-LAMP").reserved == 0
    assert not Reservation.objects.using("inventory").exists()


def test_every_message_delivered_twice_changes_nothing_more(alice_api, catalogue, broker):
    receipt = place(alice_api, order_body())
    while broker.queue:
        message = broker.queue.pop(0)
        broker.run(message)
        broker.run(message)  # at-least-once: the same message again

    saga = Saga.objects.get(id=receipt["saga"]["id"])
    assert saga.state == Saga.State.COMPLETED
    assert (stock("SKU-MUG").on_hand, stock("SKU-MUG").reserved) == (48, 0)
    assert Charge.objects.using("payments").count() == 1
    assert LedgerEntry.objects.using("payments").count() == 1
    assert Shipment.objects.using("shipping").count() == 1
    assert Notification.objects.using("notifications").count() == 1
    assert SagaEvent.objects.filter(saga=saga, kind="step_succeeded").count() == 8
    assert Saga.objects.count() == 1


def test_every_saga_event_is_recorded_in_order(alice_api, catalogue, broker):
    receipt = place(alice_api, order_body())
    broker.deliver()
    events = list(SagaEvent.objects.filter(saga_id=receipt["saga"]["id"]).order_by("seq"))
    assert [e.seq for e in events] == list(range(1, len(events) + 1))
    assert events[0].kind == "saga_created"
    started = [e.step for e in events if e.kind == "step_started"]
    assert started == [
        "reserve_stock",
        "charge_payment",
        "approve_order",
        "schedule_shipment",
        "dispatch_shipment",
        "commit_stock",
        "mark_shipped",
        "notify_customer",
    ]
    assert Saga.objects.get(id=receipt["saga"]["id"]).version == len(events)
