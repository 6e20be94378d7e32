"""TCC (try-confirm-cancel): every participant tried at once, then all confirmed or all cancelled."""

from __future__ import annotations

from decimal import Decimal

import pytest

from inventory.models import Reservation
from orchestration.audit import run_audit
from orchestration.models import Saga, SagaEvent, SagaStep
from orders.models import Order
from payments.models import Charge, LedgerEntry
from sagaplatform.kernel import faults
from sagaplatform.kernel.models import Barrier, FaultRule
from shipping.models import Shipment
from tests.conftest import mug, order_body

pytestmark = pytest.mark.django_db(transaction=True, databases="__all__")

PARTICIPANTS = ["reserve_stock", "charge_payment", "schedule_shipment", "approve_order"]


def place(api, **kwargs) -> dict:
    response = api.post("/api/orders/", {**order_body(**kwargs), "mode": "tcc"}, format="json")
    assert response.status_code == 202, response.content
    return response.json()


def events(saga_id, kind: str) -> list[str]:
    return list(SagaEvent.objects.filter(saga_id=saga_id, kind=kind).order_by("seq").values_list("step", flat=True))


def test_all_tries_succeed_then_all_confirm(alice_api, catalogue, broker):
    receipt = place(alice_api)
    broker.deliver(limit=1)  # start: every try is sent at once, before any reply
    tries = [m["payload"]["step"] for m in broker.queue if m["payload"].get("op") == "action"]
    assert sorted(tries) == sorted(PARTICIPANTS)

    broker.deliver()

    saga = Saga.objects.get(id=receipt["saga"]["id"])
    assert saga.state == "completed"
    assert sorted(events(saga.id, "step_confirmed")) == sorted(PARTICIPANTS)
    assert events(saga.id, "saga_confirming") == [""]
    assert mug() == (48, 0)  # held, then committed
    assert Reservation.objects.using("inventory").get().state == "committed"
    charge = Charge.objects.using("payments").get()
    assert charge.state == "captured"
    assert list(LedgerEntry.objects.using("payments").values_list("kind", "amount")) == [("charge", Decimal("25.00"))]
    assert Shipment.objects.using("shipping").get().state == "scheduled"
    assert Order.objects.using("orders").get(id=receipt["id"]).status == "approved"
    assert SagaStep.objects.get(saga=saga, name="notify_customer").state == "succeeded"
    assert run_audit() == []


def test_an_authorisation_is_not_money_taken(alice_api, catalogue, broker):
    place(alice_api)
    while broker.queue and broker.queue[0]["payload"].get("op") != "confirm":
        broker.run(broker.queue.pop(0))  # tries only

    assert Charge.objects.using("payments").get().state == "authorized"
    assert not LedgerEntry.objects.using("payments").exists()
    assert Shipment.objects.using("shipping").get().state == "tentative"
    assert mug() == (50, 2)


def test_a_declined_try_cancels_every_participant(alice_api, catalogue, broker):
    receipt = place(alice_api, token="tok_declined")

    broker.deliver()

    saga = Saga.objects.get(id=receipt["saga"]["id"])
    assert saga.state == "compensated"
    assert saga.failure["code"] == "card_declined"
    # The three tries that succeeded are cancelled; the declined one needs nothing.
    assert sorted(events(saga.id, "step_compensated")) == ["approve_order", "reserve_stock", "schedule_shipment"]
    assert mug() == (50, 0)
    assert Charge.objects.using("payments").get().state == "declined"  # the refusal, no money
    assert not LedgerEntry.objects.using("payments").exists()
    assert Shipment.objects.using("shipping").get().state == "cancelled"
    order = Order.objects.using("orders").get(id=receipt["id"])
    assert (order.status, order.failure_code) == ("rejected", "card_declined")
    assert run_audit() == []


def test_a_try_still_in_flight_is_cancelled_and_refused_when_it_arrives(alice_api, catalogue, broker):
    """The cancel overtakes the shipping try: the barrier turns the late try into a no-op."""
    receipt = place(alice_api, token="tok_declined")
    broker.deliver(limit=1)
    late_try = broker.take("shipping.execute")  # the shipping try is stuck in the broker

    broker.deliver()  # the decline comes back; every participant is cancelled
    for message in late_try:
        broker.run(message)
    broker.deliver()

    saga_id = receipt["saga"]["id"]
    assert Saga.objects.get(id=saga_id).state == "compensated"
    step = SagaStep.objects.get(saga_id=saga_id, name="schedule_shipment")
    assert step.state == "compensated"
    assert SagaEvent.objects.get(saga_id=saga_id, kind="step_compensated", step="schedule_shipment").data[
        "null_compensation"
    ]
    assert not Shipment.objects.using("shipping").exists()  # the late try was refused
    refused = Barrier.objects.using("shipping").get(saga_id=saga_id, op="action")
    assert refused.outcome["error"]["code"] == "compensated_before_action"
    assert run_audit() == []


def test_a_failing_confirm_is_retried_until_it_succeeds(alice_api, catalogue, broker):
    FaultRule.objects.using("payments").create(service="payments", operation="capture", fail_first=3)
    faults.clear_cache()
    receipt = place(alice_api)

    broker.deliver()

    saga_id = receipt["saga"]["id"]
    assert Saga.objects.get(id=saga_id).state == "completed"
    assert events(saga_id, "confirm_retry_scheduled") == ["charge_payment"] * 3
    assert SagaStep.objects.get(saga_id=saga_id, name="charge_payment").confirm_attempts == 4
    assert LedgerEntry.objects.using("payments").count() == 1


def test_duplicate_confirms_take_effect_once(alice_api, catalogue, broker):
    place(alice_api)
    while broker.queue:
        message = broker.queue.pop(0)
        broker.run(message)
        if message["payload"].get("op") == "confirm":
            broker.run(message)

    assert mug() == (48, 0)
    assert LedgerEntry.objects.using("payments").count() == 1
    assert run_audit() == []


def test_cancel_during_the_tries_cancels_all(alice_api, catalogue, broker):
    receipt = place(alice_api)
    broker.deliver(limit=3)  # two tries done, two in flight

    response = alice_api.post(f"{receipt['url']}cancel/", {}, format="json")
    assert response.status_code == 202
    broker.deliver()

    saga = Saga.objects.get(id=receipt["saga"]["id"])
    assert saga.state == "cancelled"
    assert mug() == (50, 0)
    assert Charge.objects.using("payments").filter(state__in=["authorized", "captured"]).count() == 0
    assert Order.objects.using("orders").get(id=receipt["id"]).status == "cancelled"
    assert run_audit() == []


def test_cancel_once_confirming_is_refused(alice_api, catalogue, broker):
    receipt = place(alice_api)
    while broker.queue and broker.queue[0]["payload"].get("op") != "confirm":
        broker.run(broker.queue.pop(0))
    assert Saga.objects.get(id=receipt["saga"]["id"]).state == "confirming"

    response = alice_api.post(f"{receipt['url']}cancel/", {}, format="json")

    assert response.status_code == 409
    assert response.json()["code"] == "not_cancellable"
    broker.deliver()
    assert Saga.objects.get(id=receipt["saga"]["id"]).state == "completed"


def test_a_step_after_the_confirms_that_fails_for_good_parks_and_an_operator_resumes_it(alice_api, catalogue, broker):
    from orchestration import engine

    FaultRule.objects.using("notifications").create(
        service="notifications", operation="send_confirmation", fail_first=10
    )
    faults.clear_cache()
    receipt = place(alice_api)
    broker.deliver()
    saga_id = receipt["saga"]["id"]
    assert Saga.objects.get(id=saga_id).state == "parked"
    assert LedgerEntry.objects.using("payments").count() == 1  # decided and confirmed: nothing undone

    FaultRule.objects.using("notifications").all().delete()
    faults.clear_cache()
    engine.saga_retry(saga_id=saga_id, actor="user:op", reason="mail relay back")
    broker.deliver()

    assert Saga.objects.get(id=saga_id).state == "completed"
    assert run_audit() == []


def test_a_confirm_refused_for_now_is_retried_not_replayed(alice_api, catalogue, broker, monkeypatch):
    from payments import services
    from payments.exceptions import PaymentNotCapturable

    real_capture = services.charge_capture
    refusals = []

    def capture(**kwargs):
        if len(refusals) < 2:
            refusals.append(1)
            raise PaymentNotCapturable("The acquirer is reconciling; try again")
        return real_capture(**kwargs)

    monkeypatch.setattr(services, "charge_capture", capture)
    receipt = place(alice_api)
    broker.deliver()

    saga_id = receipt["saga"]["id"]
    assert Saga.objects.get(id=saga_id).state == "completed"
    assert SagaStep.objects.get(saga_id=saga_id, name="charge_payment").confirm_attempts == 3
    assert Charge.objects.using("payments").get().state == "captured"
