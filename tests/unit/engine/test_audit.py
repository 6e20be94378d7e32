"""The audit: silent on a healthy platform, and it catches every kind of violation planted."""

from __future__ import annotations

import uuid
from datetime import timedelta
from decimal import Decimal

import pytest
from django.core.management import call_command
from django.db import IntegrityError, transaction
from django.utils import timezone

from inventory.models import Reservation, StockItem
from orchestration.audit import run_audit
from orchestration.models import Saga, SagaStep
from orders.models import Order
from payments import gateway
from payments.models import Charge, LedgerEntry
from sagaplatform.kernel.models import Barrier, OutboxMessage
from shipping.models import Shipment
from tests.conftest import order_body

pytestmark = pytest.mark.django_db(transaction=True, databases="__all__")


@pytest.fixture
def world(alice_api, catalogue, broker) -> dict:
    """A completed order and a compensated one (declined card), delivered to rest."""
    ok = alice_api.post("/api/orders/", order_body(), format="json").json()
    declined = alice_api.post("/api/orders/", order_body(token="tok_declined"), format="json").json()
    broker.deliver()
    assert Saga.objects.get(id=ok["saga"]["id"]).state == "completed"
    assert Saga.objects.get(id=declined["saga"]["id"]).state == "compensated"
    return {"ok": ok["saga"]["id"], "declined": declined["saga"]["id"], "broker": broker, "api": alice_api}


def rules() -> set[str]:
    return {v.rule for v in run_audit(gateway=True)}


def test_a_healthy_platform_has_no_violations(world):
    assert run_audit(gateway=True) == []
    call_command("audit")  # exits 0


def test_the_command_exits_non_zero_and_names_the_violation(world, capsys):
    Saga.objects.filter(id=world["declined"]).update(state="running")
    with pytest.raises(SystemExit) as exit_info:
        call_command("audit")
    assert exit_info.value.code == 1
    assert "saga_not_terminal" in capsys.readouterr().out


def plant_reserved_drift(world):
    StockItem.objects.using("inventory").filter(sku="SKU-MUG").update(reserved=3)


def plant_unfinished_saga(world):
    Saga.objects.filter(id=world["declined"]).update(state="compensating")


def plant_lost_start(world):
    world["api"].post("/api/orders/", order_body(), format="json")
    world["broker"].take("orchestration.start_saga")  # the broker lost it


def plant_ledger_drift(world):
    LedgerEntry.objects.using("payments").filter(charge__saga_id=world["ok"]).update(amount=Decimal("1.00"))


def plant_refund_of_a_completed_order(world):
    charge = Charge.objects.using("payments").get(saga_id=world["ok"])
    Charge.objects.using("payments").filter(id=charge.id).update(state="refunded")
    LedgerEntry.objects.using("payments").create(charge=charge, kind="refund", amount=-charge.amount)


def plant_charge_kept_on_failure(world):
    charge = Charge.objects.using("payments").get(saga_id=world["declined"])  # declined: no money
    Charge.objects.using("payments").filter(id=charge.id).update(state="captured", gateway_reference="ch_planted")
    LedgerEntry.objects.using("payments").create(charge=charge, kind="charge", amount=charge.amount)


def plant_gateway_charge_without_record(world):
    """The gateway took money for the declined order's saga under its key; nothing local says so."""
    gateway.charge(token="tok_visa", amount=Decimal("5.00"), idempotency_key=f"{world['declined']}:charge", attempt=1)


# A local change the gateway's records do not show is caught by them too (when they are shared).
GATEWAY = {"gateway_mismatch"} if gateway.shares_records() else set()


def plant_released_stock_of_a_completed_order(world):
    Reservation.objects.using("inventory").filter(saga_id=world["ok"]).update(state="released")


def plant_undispatched_shipment_of_a_completed_order(world):
    Shipment.objects.using("shipping").filter(saga_id=world["ok"]).update(state="scheduled")


def plant_order_status_drift(world):
    Order.objects.using("orders").filter(saga_id=world["ok"]).update(status="rejected")


def plant_uncompensated_step(world):
    SagaStep.objects.filter(saga_id=world["declined"], name="reserve_stock").update(state="succeeded")


def plant_shipment_for_a_failed_order(world):
    Shipment.objects.using("shipping").create(
        saga_id=world["declined"], order_id=uuid.uuid4(), address={}, tracking_number="SPX"
    )


def plant_incomplete_barrier(world):
    Barrier.objects.using("shipping").create(
        saga_id=world["ok"], step="schedule_shipment", op="compensate", outcome=None
    )


def plant_compensation_without_action(world):
    Barrier.objects.using("payments").create(
        saga_id=uuid.uuid4(), step="charge_payment", op="compensate", outcome={"status": "succeeded", "result": {}}
    )


def plant_compensation_before_action(world):
    saga_id = uuid.uuid4()
    Barrier.objects.using("payments").create(
        saga_id=saga_id, step="charge_payment", op="compensate", outcome={"status": "succeeded", "result": {}}
    )
    Barrier.objects.using("payments").create(
        saga_id=saga_id, step="charge_payment", op="action", outcome={"status": "succeeded", "result": {}}
    )
    Barrier.objects.using("payments").filter(saga_id=saga_id, op="compensate").update(
        created_at=timezone.now() - timedelta(minutes=5)
    )


def plant_outbox_backlog(world):
    with transaction.atomic(using="inventory"):
        OutboxMessage.objects.using("inventory").create(
            task="orchestration.handle_reply",
            queue="orchestrator",
            payload={},
            available_at=timezone.now() - timedelta(minutes=2),
        )


@pytest.mark.parametrize(
    ("plant", "expected"),
    [
        (plant_reserved_drift, {"stock_reserved_mismatch"}),
        (plant_unfinished_saga, {"saga_not_terminal"}),
        (plant_lost_start, {"order_without_saga"}),
        (plant_ledger_drift, {"ledger_mismatch"}),
        (plant_refund_of_a_completed_order, {"money_not_captured", *GATEWAY}),
        (plant_charge_kept_on_failure, {"money_kept", *GATEWAY}),
        (plant_released_stock_of_a_completed_order, {"reservation_mismatch"}),
        (plant_undispatched_shipment_of_a_completed_order, {"shipment_not_dispatched"}),
        (plant_order_status_drift, {"status_mismatch"}),
        (plant_uncompensated_step, {"step_not_compensated"}),
        (plant_shipment_for_a_failed_order, {"shipment_for_unfulfilled_order"}),
        (plant_incomplete_barrier, {"barrier_incomplete"}),
        (plant_compensation_without_action, {"compensation_without_action"}),
        (plant_compensation_before_action, {"compensation_before_action"}),
        (plant_outbox_backlog, {"outbox_backlog"}),
    ],
    ids=lambda p: p.__name__ if callable(p) else "",
)
def test_each_planted_violation_is_caught(world, plant, expected):
    plant(world)
    assert rules() == expected


@pytest.mark.skipif(not gateway.shares_records(), reason="the gateway's records are per process (embedded)")
def test_a_gateway_charge_with_no_local_record_is_caught(world):
    plant_gateway_charge_without_record(world)
    assert rules() == {"gateway_mismatch"}


def test_negative_or_oversold_stock_cannot_even_be_written(world):
    """The audit checks it too, but the database refuses it first."""
    for reserved, on_hand in ((5, 4), (-1, 10)):
        with pytest.raises(IntegrityError), transaction.atomic(using="inventory"):
            StockItem.objects.using("inventory").filter(sku="SKU-LAMP").update(reserved=reserved, on_hand=on_hand)
    assert run_audit(gateway=True) == []
