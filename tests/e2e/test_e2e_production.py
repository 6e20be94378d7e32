"""End to end in production mode: the API in this process, a real `celery worker` process on
Redis, every service on its own PostgreSQL database. Nothing is eager, nothing is faked."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from decimal import Decimal

import pytest
from django.db import connections
from rest_framework.test import APIClient

from inventory.models import Reservation, StockItem
from inventory.services import stock_set
from notifications.models import Notification
from orchestration.models import Saga, SagaEvent, SagaStep
from orders.models import Order, Product
from payments.models import Charge, LedgerEntry
from shipping.models import Shipment
from tests.conftest import order_body
from tests.processes import Worker, flush_broker, wait_for

pytestmark = [pytest.mark.production, pytest.mark.django_db(transaction=True, databases="__all__")]

TERMINAL = {"completed", "compensated", "failed", "parked", "cancelled"}


@pytest.fixture(scope="module")
def worker(django_db_setup, django_db_blocker):
    flush_broker()
    process = Worker(name="e2e").start()
    yield process
    process.stop()


def settle(api: APIClient, receipt: dict, *, timeout: float = 30) -> dict:
    def terminal():
        detail = api.get(receipt["url"]).json()
        return detail if detail["saga"]["state"] in TERMINAL else None

    return wait_for(terminal, timeout=timeout, interval=0.1, message=f"saga of order {receipt['id']} to finish")


def place(api: APIClient, body: dict) -> dict:
    response = api.post("/api/orders/", body, format="json")
    assert response.status_code == 202, response.content
    return response.json()


def test_happy_path_completes_in_every_service_database(worker, alice_api, catalogue):
    receipt = place(
        alice_api, order_body(items=[{"sku": "SKU-MUG", "quantity": 2}, {"sku": "SKU-BOOK", "quantity": 1}])
    )

    detail = settle(alice_api, receipt)

    assert detail["saga"]["state"] == "completed"
    assert detail["status"] == "shipped"
    saga_id = receipt["saga"]["id"]
    assert Order.objects.using("orders").get(id=receipt["id"]).status == "shipped"
    assert set(Reservation.objects.using("inventory").filter(saga_id=saga_id).values_list("sku", "state")) == {
        ("SKU-MUG", "committed"),
        ("SKU-BOOK", "committed"),
    }
    mug = StockItem.objects.using("inventory").get(sku="SKU-MUG")
    assert (mug.on_hand, mug.reserved) == (48, 0)
    charge = Charge.objects.using("payments").get(saga_id=saga_id)
    assert (charge.amount, charge.state) == (Decimal("69.00"), "captured")
    assert Shipment.objects.using("shipping").get(saga_id=saga_id).state == "dispatched"
    wait_for(
        lambda: Notification.objects.using("notifications").filter(order_id=receipt["id"], state="sent").exists(),
        timeout=10,
        message="the confirmation to be delivered",
    )


def test_declined_payment_compensates_and_the_order_reads_failed(worker, alice_api, catalogue):
    before = StockItem.objects.using("inventory").get(sku="SKU-LAMP")
    receipt = place(alice_api, order_body(token="tok_declined", items=[{"sku": "SKU-LAMP", "quantity": 4}]))

    detail = settle(alice_api, receipt)

    assert detail["saga"]["state"] == "compensated"
    assert detail["status"] == "rejected"
    assert detail["failure"] == {"code": "card_declined", "message": "The card was declined"}
    after = StockItem.objects.using("inventory").get(sku="SKU-LAMP")
    assert (after.on_hand, after.reserved) == (before.on_hand, before.reserved)
    assert Reservation.objects.using("inventory").get(saga_id=receipt["saga"]["id"]).state == "released"
    assert Charge.objects.using("payments").get().state == "declined"  # the refusal, no money
    assert not LedgerEntry.objects.using("payments").exists()
    assert not Shipment.objects.using("shipping").exists()


def test_transient_failures_retry_with_backoff_then_succeed(worker, alice_api, catalogue):
    receipt = place(alice_api, order_body(token="tok_flaky_2"))

    detail = settle(alice_api, receipt)

    assert detail["saga"]["state"] == "completed"
    saga = Saga.objects.get(id=receipt["saga"]["id"])
    step = SagaStep.objects.get(saga=saga, name="charge_payment")
    assert step.attempts == 3
    retries = list(SagaEvent.objects.filter(saga=saga, kind="retry_scheduled").order_by("seq"))
    assert [e.data["attempt"] for e in retries] == [1, 2]
    assert all(0 <= e.data["delay"] <= 0.5 * 2**i for i, e in enumerate(retries))
    assert LedgerEntry.objects.using("payments").filter(charge__saga_id=saga.id).count() == 1


def test_fifty_concurrent_orders_for_ten_units_sell_exactly_ten(worker, django_user_model):
    Product.objects.using("orders").create(sku="SKU-HOT", name="Hot item", unit_price=Decimal("5.00"))
    stock_set(sku="SKU-HOT", on_hand=10)
    customers = [django_user_model.objects.create_user(f"buyer{i}", f"buyer{i}@example.com", "pw") for i in range(50)]

    def buy(user) -> dict:
        api = APIClient()
        api.force_authenticate(user)
        try:
            return place(api, order_body(items=[{"sku": "SKU-HOT", "quantity": 1}]))
        finally:
            connections.close_all()

    with ThreadPoolExecutor(max_workers=10) as pool:
        receipts = list(pool.map(buy, customers))

    wait_for(
        lambda: Saga.objects.filter(state__in=TERMINAL).count() == 50,
        timeout=120,
        interval=0.5,
        message="all 50 sagas to finish",
    )
    states = list(
        Order.objects.using("orders").filter(id__in=[r["id"] for r in receipts]).values_list("status", flat=True)
    )
    assert states.count("shipped") == 10
    assert states.count("rejected") == 40
    item = StockItem.objects.using("inventory").get(sku="SKU-HOT")
    assert (item.on_hand, item.reserved) == (0, 0)  # sold out, nothing oversold
    # Each of the 10 winners reserved (one version each) and committed (one more); the refused
    # orders changed nothing.
    assert item.version == 20
    assert Reservation.objects.using("inventory").filter(sku="SKU-HOT", state="committed").count() == 10
    assert Charge.objects.using("payments").count() == 10
