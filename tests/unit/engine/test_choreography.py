"""Choreography: the order flow with no coordinator, and the tracker that rebuilds the saga."""

from __future__ import annotations

import uuid
from datetime import timedelta
from decimal import Decimal

import pytest
from django.core import mail
from django.db import transaction
from django.utils import timezone

from orchestration import sweeper
from orchestration.audit import run_audit
from orchestration.models import Alert, Saga, SagaEvent, SagaStep
from orders.models import Order
from payments import gateway, services
from payments.models import Charge, LedgerEntry
from sagaplatform.kernel import barrier, choreography, faults
from sagaplatform.kernel.commands import ACTION, Command
from sagaplatform.kernel.models import FaultRule
from shipping.models import Shipment
from tests.conftest import mug, order_body

pytestmark = pytest.mark.django_db(transaction=True, databases="__all__")


def place(api, **kwargs) -> dict:
    response = api.post("/api/orders/", {**order_body(**kwargs), "mode": "choreography"}, format="json")
    assert response.status_code == 202, response.content
    return response.json()


def steps(saga_id) -> dict[str, str]:
    return dict(SagaStep.objects.filter(saga_id=saga_id).values_list("name", "state"))


def take_reaction(broker, step: str) -> list[dict]:
    taken = [
        m for m in broker.queue if m["task"].endswith(".react") and m["payload"]["reaction"].startswith(f"{step}:")
    ]
    broker.queue = [m for m in broker.queue if m not in taken]
    return taken


def test_the_happy_path_needs_no_coordinator(alice_api, catalogue, broker):
    receipt = place(alice_api)

    broker.deliver()

    tasks = {m["task"] for m in broker.delivered}
    assert not any(task.endswith(".execute") or task == "orchestration.start_saga" for task in tasks)
    saga = Saga.objects.get(id=receipt["saga"]["id"])
    assert (saga.definition, saga.state) == ("place_order_choreography", "completed")
    assert set(steps(saga.id).values()) == {"succeeded", "pending"}  # the failure steps never ran
    assert Order.objects.using("orders").get(id=receipt["id"]).status == "shipped"
    assert mug() == (48, 0)
    assert Charge.objects.using("payments").get().state == "captured"
    assert Shipment.objects.using("shipping").get().state == "dispatched"
    assert [m.subject for m in mail.outbox] == ["Your order is on its way"]
    observed = SagaEvent.objects.filter(saga=saga, kind="event_observed").values_list("data__event", flat=True)
    assert {"order.placed", "stock.reserved", "payment.captured", "order.approved", "shipment.scheduled"} <= set(
        observed
    )
    assert run_audit() == []


def test_a_declined_card_makes_inventory_release_and_the_order_reject(alice_api, catalogue, broker):
    receipt = place(alice_api, token="tok_declined")

    broker.deliver()

    saga = Saga.objects.get(id=receipt["saga"]["id"])
    assert saga.state == "compensated"
    assert saga.failure["code"] == "card_declined"
    assert steps(saga.id)["reserve_stock"] == "compensated"
    assert mug() == (50, 0)
    order = Order.objects.using("orders").get(id=receipt["id"])
    assert (order.status, order.failure_code) == ("rejected", "card_declined")
    assert [m.subject for m in mail.outbox] == ["Your order could not be completed"]
    assert run_audit() == []


def test_a_service_that_gives_up_undoes_itself_and_the_earlier_ones_compensate(alice_api, catalogue, broker):
    FaultRule.objects.using("shipping").create(service="shipping", operation="schedule", fail_first=99)
    faults.clear_cache()
    receipt = place(alice_api)

    broker.deliver()

    saga = Saga.objects.get(id=receipt["saga"]["id"])
    assert saga.state == "compensated"
    assert saga.failure["code"] == "retries_exhausted"
    state = steps(saga.id)
    assert (state["approve_order"], state["charge_payment"], state["reserve_stock"]) == ("compensated",) * 3
    assert Charge.objects.using("payments").get().state == "refunded"
    assert sum(LedgerEntry.objects.using("payments").values_list("amount", flat=True), Decimal(0)) == 0
    assert mug() == (50, 0)
    assert not Shipment.objects.using("shipping").exists()
    assert Order.objects.using("orders").get(id=receipt["id"]).status == "rejected"
    assert run_audit() == []


def test_every_event_delivered_twice_changes_nothing_more(alice_api, catalogue, broker):
    receipt = place(alice_api)
    while broker.queue:
        message = broker.queue.pop(0)
        broker.run(message)
        broker.run(message)

    assert Saga.objects.get(id=receipt["saga"]["id"]).state == "completed"
    assert mug() == (48, 0)
    assert LedgerEntry.objects.using("payments").count() == 1
    assert Shipment.objects.using("shipping").count() == 1
    assert run_audit() == []


def test_the_tracker_rebuilds_the_same_saga_whatever_order_the_events_arrive_in(alice_api, catalogue, broker):
    receipt = place(alice_api)
    held = []
    while broker.queue:
        message = broker.queue.pop(0)
        if message["task"] == "orchestration.track_event":
            held.append(message)
        else:
            broker.run(message)
    assert not Saga.objects.filter(id=receipt["saga"]["id"]).exists()  # it has heard nothing yet

    for message in reversed(held):  # the last news first
        broker.run(message)
    broker.deliver()

    saga = Saga.objects.get(id=receipt["saga"]["id"])
    assert saga.state == "completed"
    assert {
        name: state for name, state in steps(saga.id).items() if name not in ("reject_order", "notify_failure")
    } == {name: "succeeded" for name in steps(saga.id) if name not in ("reject_order", "notify_failure")}
    assert run_audit() == []


def test_a_missing_event_is_detected_by_its_lease_and_the_service_nudged(alice_api, catalogue, broker):
    receipt = place(alice_api)
    while broker.queue:
        message = broker.queue.pop(0)
        if message["task"] == "orders.react" and message["payload"]["reaction"] == "approve_order:action":
            continue  # the order service never hears of the payment
        broker.run(message)
    saga_id = receipt["saga"]["id"]
    assert steps(saga_id)["approve_order"] == "running"

    SagaStep.objects.filter(saga_id=saga_id, name="approve_order").update(
        deadline_at=timezone.now() - timedelta(seconds=1)
    )
    assert sweeper.sweep_once()["timed_out"] == 1
    broker.deliver()

    assert Saga.objects.get(id=saga_id).state == "completed"
    assert SagaEvent.objects.filter(saga_id=saga_id, kind="event_nudged", step="approve_order").count() == 1


def complete_beside_a_held_chain(api, broker, reaction: str, *, ends: str = "completed") -> tuple[dict, dict]:
    """Place an order and hold the first event for `reaction` (a chain of retries still to come)
    while the tracker's nudge runs it a second time and the saga ends (`ends`). Returns the
    receipt and the held message."""
    receipt = place(api)
    held = None
    while broker.queue or broker.release_delayed():  # the retries' delayed messages too
        message = broker.queue.pop(0)
        if held is None and message["payload"].get("reaction") == reaction:
            held = message
            broker.run({**message, "payload": {**message["payload"], "nudge": True}})
            continue
        broker.run(message)
    assert held is not None
    assert Saga.objects.get(id=receipt["saga"]["id"]).state == ends
    return receipt, held


def give_up(broker, held: dict, *, service: str, operation: str, attempt: int) -> None:
    """The held chain's last attempt fails, and it gives up."""
    FaultRule.objects.using(service).create(service=service, operation=operation, fail_first=99)
    faults.clear_cache()
    broker.run({**held, "payload": {**held["payload"], "attempt": attempt}})
    broker.deliver()


def test_a_reaction_that_gives_up_after_another_delivery_answered_undoes_nothing(alice_api, catalogue, broker):
    """Seen in `manage.py simulate` with a worker killed: the charge's retries kept failing, the
    tracker nudged the step, the nudged run charged and the order completed; then the first
    chain's last attempt failed too and gave up, refunding the charge of a completed order. The
    nudged run's outcome went out with its event: the give-up must leave it be."""
    receipt, held = complete_beside_a_held_chain(alice_api, broker, "charge_payment:action")
    saga_id = receipt["saga"]["id"]

    give_up(broker, held, service="payments", operation="charge", attempt=5)

    assert Saga.objects.get(id=saga_id).state == "completed"
    assert Charge.objects.using("payments").get().state == "captured"
    assert list(LedgerEntry.objects.using("payments").values_list("kind", flat=True)) == ["charge"]
    assert mug() == (48, 0)  # no payment failure reached inventory: the stock stays sold
    observed = SagaEvent.objects.filter(saga_id=saga_id, kind="event_observed").values_list("data__event", flat=True)
    assert "payment.failed" not in set(observed)
    assert run_audit() == []


def test_a_step_with_no_undo_that_gives_up_after_another_delivery_answered_tells_nothing(alice_api, catalogue, broker):
    """As above for a step after the point of no return (no undo): the late give-up's note
    would tell the tracker the step failed."""
    receipt, held = complete_beside_a_held_chain(alice_api, broker, "mark_shipped:action")
    saga_id = receipt["saga"]["id"]

    give_up(broker, held, service="orders", operation="ship", attempt=30)

    emitters = SagaEvent.objects.filter(saga_id=saga_id, kind="event_observed").values_list("data__emitter", flat=True)
    assert [e for e in emitters if e and e.get("status") == "gave_up"] == []
    assert steps(saga_id)["mark_shipped"] == "succeeded"
    assert Order.objects.using("orders").get(id=receipt["id"]).status == "shipped"
    assert run_audit() == []


def test_a_compensation_that_gives_up_after_another_delivery_answered_tells_nothing(alice_api, catalogue, broker):
    """As above for an undo: the refund's nudged run refunded, the saga ended compensated, then
    the first chain's last attempt gave up: its note would tell the tracker the refund failed."""
    FaultRule.objects.using("shipping").create(service="shipping", operation="schedule", fail_first=99)
    faults.clear_cache()
    receipt, held = complete_beside_a_held_chain(alice_api, broker, "charge_payment:compensate", ends="compensated")
    saga_id = receipt["saga"]["id"]

    give_up(broker, held, service="payments", operation="refund", attempt=10)

    emitters = SagaEvent.objects.filter(saga_id=saga_id, kind="event_observed").values_list("data__emitter", flat=True)
    assert [e for e in emitters if e and e["step"] == "charge_payment" and e.get("status") == "gave_up"] == []
    assert steps(saga_id)["charge_payment"] == "compensated"
    assert Charge.objects.using("payments").get().state == "refunded"
    assert run_audit() == []


def test_a_give_up_racing_a_nudged_charge_answered_before_its_undo_announces_no_capture(
    alice_api, catalogue, broker, monkeypatch
):
    """The nudged run's gateway call was in flight when the give-up looked (the charge pending,
    nothing to settle), and its answer was recorded before the give-up's undo refunded the
    charge. The give-up then stores the refunded charge as the action's outcome: the nudged run,
    once it gets to its transaction, replays it and tells the give-up's failure again, where it
    would have announced the capture of a refunded charge."""
    receipt = place(alice_api)
    saga_id = uuid.UUID(receipt["saga"]["id"])
    held = None
    while held is None:
        message = broker.queue.pop(0)
        if message["payload"].get("reaction") == "charge_payment:action":
            held = message
        else:
            broker.run(message)
    # The nudged run's outside step, up to its gateway call: its intent committed, the call in flight.
    rule = next(r for r in choreography.reactions() if r.service == "payments" and r.key == "charge_payment:action")
    payload = choreography.payload_for(rule, held["payload"])
    nudged = Command(saga_id=saga_id, step=rule.step, op=ACTION, operation="charge", attempt=1, payload=payload)
    with transaction.atomic(using="payments"):
        assert barrier.begin(using="payments", command=nudged) is None
        services.charge_begin(
            saga_id=saga_id,
            order_id=payload["order_id"],
            amount=Decimal(payload["amount"]),
            currency=payload["currency"],
            token=services.payment_method_token(reference=payload["payment_method"]),
        )
    Charge.objects.using("payments").filter(saga_id=saga_id).update(calls_in_doubt=1)

    settle = choreography._SETTLERS[("payments", "charge")]

    def settle_then_the_call_in_flight_answers(*, saga_id, step):
        settle(saga_id=saga_id, step=step)
        charge = Charge.objects.using("payments").get(saga_id=saga_id)
        if charge.state == Charge.State.PENDING:
            taken = gateway.charge(
                token=charge.payment_token, amount=charge.amount, idempotency_key=charge.idempotency_key, attempt=1
            )
            services._record_taken(charge, taken.reference)  # the nudged run records the answer

    monkeypatch.setitem(choreography._SETTLERS, ("payments", "charge"), settle_then_the_call_in_flight_answers)
    give_up(broker, held, service="payments", operation="charge", attempt=5)
    FaultRule.objects.using("payments").all().delete()
    faults.clear_cache()
    choreography.react(service="payments", message={**held["payload"], "nudge": True}, admitted=True)
    broker.deliver()

    assert Saga.objects.get(id=saga_id).state == "compensated"
    assert Charge.objects.using("payments").get().state == "refunded"
    assert list(LedgerEntry.objects.using("payments").values_list("kind", flat=True)) == ["charge", "refund"]
    observed = SagaEvent.objects.filter(saga_id=saga_id, kind="event_observed").values_list("data__event", flat=True)
    assert "payment.captured" not in set(observed)
    assert mug() == (50, 0)
    assert run_audit() == []


def test_an_event_that_never_comes_parks_the_saga(alice_api, catalogue, broker):
    receipt = place(alice_api)
    saga_id = receipt["saga"]["id"]
    for _ in range(5):
        while broker.queue:
            message = broker.queue.pop(0)
            if message["task"] == "orders.react" and message["payload"]["reaction"] == "approve_order:action":
                continue  # lost, every time
            broker.run(message)
        SagaStep.objects.filter(saga_id=saga_id, name="approve_order").update(
            deadline_at=timezone.now() - timedelta(seconds=1)
        )
        sweeper.sweep_once()

    assert Saga.objects.get(id=saga_id).state == "parked"
    assert SagaEvent.objects.filter(saga_id=saga_id, kind="event_nudged").count() == 3
    assert "approve_order" in Alert.objects.get(saga_id=saga_id).message


def test_cancel_before_anything_happened(alice_api, catalogue, broker):
    receipt = place(alice_api)

    assert alice_api.post(f"{receipt['url']}cancel/", {}, format="json").status_code == 202
    broker.deliver()

    saga = Saga.objects.get(id=receipt["saga"]["id"])
    assert saga.state == "cancelled"
    assert Order.objects.using("orders").get(id=receipt["id"]).status == "cancelled"
    assert mug() == (50, 0)
    assert not Charge.objects.using("payments").filter(state="captured").exists()
    assert run_audit() == []


def test_cancel_after_payment_refunds_and_releases(alice_api, catalogue, broker):
    receipt = place(alice_api)
    while broker.queue and broker.queue[0]["task"] != "orders.react":
        broker.run(broker.queue.pop(0))  # reserved and charged

    assert alice_api.post(f"{receipt['url']}cancel/", {}, format="json").status_code == 202
    broker.deliver()

    saga = Saga.objects.get(id=receipt["saga"]["id"])
    assert saga.state == "cancelled"
    assert Charge.objects.using("payments").get().state == "refunded"
    assert mug() == (50, 0)
    assert Order.objects.using("orders").get(id=receipt["id"]).status == "cancelled"
    assert [m.subject for m in mail.outbox] == ["Your order is cancelled"]
    assert run_audit() == []


def test_cancel_in_the_handling_window_holds_the_dispatch(alice_api, catalogue, broker, settings):
    settings.SHIPPING_HANDLING_SECONDS = 3600
    receipt = place(alice_api)
    while broker.queue:  # the dispatch waits out the handling window in the shipping outbox
        broker.run(broker.queue.pop(0))

    assert alice_api.post(f"{receipt['url']}cancel/", {}, format="json").status_code == 202
    broker.deliver()  # the hold, then the window ends: the dispatch arrives after its hold

    dispatched = [m for m in broker.delivered if m["payload"].get("reaction") == "dispatch_shipment:action"]
    assert len(dispatched) == 1

    assert Saga.objects.get(id=receipt["saga"]["id"]).state == "cancelled"
    assert Shipment.objects.using("shipping").get().state == "cancelled"
    assert Charge.objects.using("payments").get().state == "refunded"
    assert run_audit() == []


def test_cancel_after_dispatch_is_refused(alice_api, catalogue, broker):
    receipt = place(alice_api)
    broker.deliver()

    response = alice_api.post(f"{receipt['url']}cancel/", {}, format="json")

    assert response.status_code == 409
    assert Order.objects.using("orders").get(id=receipt["id"]).status == "shipped"


def test_a_step_after_the_dispatch_that_fails_for_good_parks(alice_api, catalogue, broker):
    FaultRule.objects.using("inventory").create(service="inventory", operation="commit", fail_first=1000)
    faults.clear_cache()
    receipt = place(alice_api)

    broker.deliver()

    saga = Saga.objects.get(id=receipt["saga"]["id"])
    assert saga.state == "parked"  # the parcel left: nothing is undone, a person decides
    assert steps(saga.id)["commit_stock"] == "failed"
    assert Shipment.objects.using("shipping").get().state == "dispatched"
    assert Charge.objects.using("payments").get().state == "captured"
    assert Alert.objects.filter(saga=saga).exists()


def test_a_dispatch_that_never_happens_compensates_everything(alice_api, catalogue, broker):
    FaultRule.objects.using("shipping").create(service="shipping", operation="dispatch", fail_first=1000)
    faults.clear_cache()
    receipt = place(alice_api)

    broker.deliver()

    saga = Saga.objects.get(id=receipt["saga"]["id"])
    assert saga.state == "compensated", steps(saga.id)
    assert steps(saga.id)["dispatch_shipment"] == "failed"
    assert Shipment.objects.using("shipping").get().state == "cancelled"
    assert Charge.objects.using("payments").get().state == "refunded"
    assert mug() == (50, 0)
    assert run_audit() == []


def test_an_operator_skip_lets_the_choreographed_undo_go_on(alice_api, catalogue, broker):
    from orchestration import engine

    FaultRule.objects.using("payments").create(service="payments", operation="refund", failure_rate=1.0)
    FaultRule.objects.using("shipping").create(service="shipping", operation="schedule", fail_first=1000)
    faults.clear_cache()
    receipt = place(alice_api)
    broker.deliver()
    saga_id = receipt["saga"]["id"]
    assert Saga.objects.get(id=saga_id).state == "parked"
    assert steps(saga_id)["charge_payment"] == "compensation_failed"

    engine.saga_skip(saga_id=saga_id, step_name="charge_payment", actor="user:op", reason="refunded by hand")
    broker.deliver()

    assert Saga.objects.get(id=saga_id).state == "compensated"
    assert mug() == (50, 0)  # the rest of the undo ran
    assert Order.objects.using("orders").get(id=receipt["id"]).status == "rejected"
