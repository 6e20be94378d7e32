"""Every transaction style, with a failure injected at each step in turn: exactly the right
compensations, in the right order, and a clean audit."""

from __future__ import annotations

import pytest

from inventory.models import StockItem
from orchestration.audit import run_audit
from orchestration.models import Saga, SagaEvent
from orders.models import Order
from payments.models import Charge
from sagaplatform.kernel import faults
from sagaplatform.kernel.models import FaultRule
from tests.conftest import order_body

pytestmark = pytest.mark.django_db(transaction=True, databases="__all__")

# The operation each style runs for a step's forward action.
FORWARD = {
    "orchestrated": {
        "reserve_stock": "reserve",
        "charge_payment": "charge",
        "approve_order": "approve",
        "schedule_shipment": "schedule",
    },
    "tcc": {
        "reserve_stock": "reserve",
        "charge_payment": "authorize",
        "approve_order": "check_pending",
        "schedule_shipment": "book_tentative",
    },
}
FORWARD["parallel"] = FORWARD["choreography"] = FORWARD["orchestrated"]
SERVICE = {
    "reserve_stock": "inventory",
    "charge_payment": "payments",
    "approve_order": "orders",
    "schedule_shipment": "shipping",
}
ORDER = ["reserve_stock", "charge_payment", "approve_order", "schedule_shipment"]


def fail_for_good(step: str, mode: str) -> None:
    service = SERVICE[step]
    FaultRule.objects.using(service).create(service=service, operation=FORWARD[mode][step], fail_first=1000)
    faults.clear_cache()


def undone(saga_id) -> list[str]:
    """Steps whose compensation took effect (not a no-op), in the order they were undone."""
    events = SagaEvent.objects.filter(saga_id=saga_id, kind="step_compensated").order_by("seq")
    return [e.step for e in events if not (e.data or {}).get("null_compensation")]


@pytest.mark.parametrize("mode", ["orchestrated", "parallel", "tcc", "choreography"])
@pytest.mark.parametrize("failing", ORDER)
def test_a_step_failing_for_good_undoes_exactly_what_succeeded(alice_api, catalogue, broker, mode, failing):
    fail_for_good(failing, mode)
    response = alice_api.post("/api/orders/", {**order_body(), "mode": mode}, format="json")
    receipt = response.json()

    broker.deliver()

    saga = Saga.objects.get(id=receipt["saga"]["id"])
    assert saga.state == "compensated", saga.failure
    assert saga.failure["code"] == "retries_exhausted"
    order = Order.objects.using("orders").get(id=receipt["id"])
    assert (order.status, order.failure_code) == ("rejected", "retries_exhausted")
    item = StockItem.objects.using("inventory").get(sku="SKU-MUG")
    assert (item.on_hand, item.reserved) == (50, 0)
    assert not Charge.objects.using("payments").filter(state__in=["authorized", "captured"]).exists()

    compensations = undone(saga.id)
    if mode in ("orchestrated", "choreography"):
        # Strictly the steps before the failing one, last first.
        assert compensations == list(reversed(ORDER[: ORDER.index(failing)]))
    elif mode == "parallel":
        # Stock and payment ran side by side: both are undone after the approval that depended
        # on them, in either order.
        before = ORDER[: ORDER.index(failing)] if failing in ("approve_order", "schedule_shipment") else []
        if failing in ("reserve_stock", "charge_payment"):
            before = [s for s in ("reserve_stock", "charge_payment") if s != failing]
        assert sorted(compensations) == sorted(before)
        if "approve_order" in compensations:
            assert compensations.index("approve_order") < compensations.index("reserve_stock")
            assert compensations.index("approve_order") < compensations.index("charge_payment")
    else:
        # TCC: every other participant tried, and every try is cancelled.
        assert sorted(compensations) == sorted(s for s in ORDER if s != failing)
    assert run_audit() == []


@pytest.mark.parametrize("mode", ["orchestrated", "parallel", "tcc", "choreography"])
def test_a_cancel_at_every_point_of_the_flow_ends_consistent(alice_api, catalogue, broker, mode):
    """Cancel after 0, 1, 2, ... messages have been delivered, until the order has shipped: a
    202 always ends cancelled with everything undone, a 409 always ends completed."""
    item = StockItem.objects.using("inventory")
    point = 0
    outcomes = set()
    while True:
        on_hand_before = item.get(sku="SKU-BOOK").on_hand
        response = alice_api.post(
            "/api/orders/", {**order_body(items=[{"sku": "SKU-BOOK", "quantity": 1}]), "mode": mode}, format="json"
        )
        receipt = response.json()
        broker.deliver(limit=point)
        cancel = alice_api.post(f"{receipt['url']}cancel/", {}, format="json")
        broker.deliver()

        saga = Saga.objects.get(id=receipt["saga"]["id"])
        order = Order.objects.using("orders").get(id=receipt["id"])
        charge = Charge.objects.using("payments").filter(saga_id=saga.id).first()
        book = item.get(sku="SKU-BOOK")
        refused_later = SagaEvent.objects.filter(saga=saga, kind="saga_cancel_refused").exists()
        if cancel.status_code == 202 and refused_later:
            # Choreography only: no coordinator decides atomically, so a cancel that raced the
            # dispatch and lost is refused by the services afterwards; the order ships.
            assert mode == "choreography", point
            assert (saga.state, order.status, charge.state) == ("completed", "shipped", "captured"), point
            assert book.on_hand == on_hand_before - 1, point
        elif cancel.status_code == 202:
            assert (saga.state, order.status) == ("cancelled", "cancelled"), point
            assert book.on_hand == on_hand_before, point
            assert charge is None or charge.state in ("refunded", "voided"), point
        else:
            assert cancel.status_code == 409, point
            assert saga.state == "completed", point
            assert book.on_hand == on_hand_before - 1, point
            assert charge.state == "captured", point
        assert book.reserved == 0, point
        assert saga.deadline_at is None, point  # ended: nothing left to expire
        outcomes.add(cancel.status_code)
        if cancel.status_code == 409:
            break  # from here on every cancel comes too late
        point += 1
    assert outcomes == {202, 409}
    assert point > 3  # cancellable through several steps
    assert run_audit() == []
