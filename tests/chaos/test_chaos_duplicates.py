"""Every message delivered twice by the real broker (commands, replies, compensations, saga
starts, deliveries): each effect happens once."""

from __future__ import annotations

from decimal import Decimal

import pytest

from inventory.models import Reservation, StockItem
from notifications.models import Notification
from orchestration.audit import run_audit
from orchestration.models import Saga
from payments.models import Charge, LedgerEntry
from shipping.models import Shipment
from tests.chaos.test_chaos import inject, place, settled
from tests.stack import PASSWORD, Stack

pytestmark = [pytest.mark.production, pytest.mark.django_db(transaction=True, databases="__all__")]


@pytest.fixture(scope="module")
def doubling_stack(django_db_setup, django_db_blocker):
    stack = Stack("duplicates", step_timeout=5.0)
    stack.env["SAGA_FAULT_DUPLICATE_DELIVERY"] = "1"
    stack.start()
    yield stack
    stack.stop()


def test_every_message_twice_every_effect_once(doubling_stack, django_user_model, catalogue):
    customer = django_user_model.objects.create_user("dup", "dup@example.com", PASSWORD).username
    inject("shipping", operation="schedule", fail_first=1)  # a retry on the way
    completed = place(doubling_stack, customer)
    declined = place(doubling_stack, customer, token="tok_declined", items=[{"sku": "SKU-LAMP", "quantity": 1}])

    settled([completed["saga"]["id"], declined["saga"]["id"]])

    ok, failed = (Saga.objects.get(id=r["saga"]["id"]) for r in (completed, declined))
    assert (ok.state, failed.state) == ("completed", "compensated")
    assert Reservation.objects.using("inventory").filter(saga_id=ok.id).count() == 1
    mug = StockItem.objects.using("inventory").get(sku="SKU-MUG")
    assert (mug.on_hand, mug.reserved) == (48, 0)
    assert StockItem.objects.using("inventory").get(sku="SKU-LAMP").reserved == 0
    assert list(LedgerEntry.objects.using("payments").values_list("kind", "amount")) == [("charge", Decimal("25.00"))]
    # One charge taken; the declined card's charge is only the gateway's recorded refusal.
    assert sorted(Charge.objects.using("payments").values_list("state", flat=True)) == ["captured", "declined"]
    assert Shipment.objects.using("shipping").count() == 1
    assert Notification.objects.using("notifications").filter(kind="order_confirmed").count() == 1
    assert Notification.objects.using("notifications").filter(kind="order_failed").count() == 1
    # The duplicates did arrive, and were turned into replays.
    assert "barrier replay" in doubling_stack.log("worker0")
    assert run_audit() == []
