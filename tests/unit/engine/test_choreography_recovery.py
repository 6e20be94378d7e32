"""Choreography after the broker lost messages it had already accepted: the tracker still gets a
saga for every order, leases every step whose event it is owed, and the services publish again
what they already published when asked. (With real processes: tests/chaos/test_chaos_broker_loss.py.)"""

from __future__ import annotations

from datetime import timedelta

import pytest
from django.utils import timezone

from orchestration import sweeper
from orchestration.audit import run_audit
from orchestration.models import Saga, SagaStep
from orders.models import Order
from orders.services import order_reannounce_pending
from payments.models import Charge
from sagaplatform.kernel import faults
from sagaplatform.kernel.models import FaultRule
from shipping.models import Shipment
from tests.conftest import mug, order_body

pytestmark = pytest.mark.django_db(transaction=True, databases="__all__")

TRACK = "orchestration.track_event"


def place(api, **kwargs) -> dict:
    response = api.post("/api/orders/", {**order_body(**kwargs), "mode": "choreography"}, format="json")
    assert response.status_code == 202, response.content
    return response.json()


def deliver_losing(broker, lost) -> None:
    """Deliver everything (delayed messages once nothing else is queued), dropping the messages
    `lost(message)` picks (the broker lost them)."""
    while broker.queue or broker.release_delayed():
        message = broker.queue.pop(0)
        if not lost(message):
            broker.run(message)


def reaction(message: dict) -> str | None:
    return message["payload"].get("reaction") if message["task"].endswith(".react") else None


def event(message: dict) -> str | None:
    return message["payload"].get("event")


def time_passes(broker, *, rounds: int = 6) -> None:
    """Leases run out and the sweeper acts, a few times over, with nothing lost any more."""
    for _ in range(rounds):
        past = timezone.now() - timedelta(seconds=1)
        SagaStep.objects.filter(deadline_at__isnull=False).update(deadline_at=past)
        Order.objects.using("orders").update(reannounce_at=timezone.now() - timedelta(seconds=1))
        order_reannounce_pending()
        sweeper.sweep_once()
        broker.deliver()


def test_an_order_the_tracker_never_heard_of_is_announced_to_it_until_it_has_the_saga(alice_api, catalogue, broker):
    receipt = place(alice_api)
    # Every copy to the tracker is lost, and so is shipping's order.approved: the card is
    # captured, the stock held, the order approved, and no one knows the saga exists.
    deliver_losing(broker, lambda m: m["task"] == TRACK or reaction(m) == "schedule_shipment:action")
    assert Order.objects.using("orders").get(id=receipt["id"]).status == "approved"
    assert not Saga.objects.filter(id=receipt["saga"]["id"]).exists()

    time_passes(broker)

    saga = Saga.objects.get(id=receipt["saga"]["id"])
    assert saga.state == "completed"
    order = Order.objects.using("orders").get(id=receipt["id"])
    assert (order.status, order.start_message_id) == ("shipped", None)  # announced no more
    assert Shipment.objects.using("shipping").get().state == "dispatched"
    assert Charge.objects.using("payments").get().state == "captured"
    assert mug() == (48, 0)
    assert run_audit() == []


def test_a_saga_first_heard_of_at_its_end_is_watched_back_to_its_start(alice_api, catalogue, broker):
    receipt = place(alice_api)
    late = {"stock.committed", "order.shipped", "customer.notified"}
    # The parcel ships, but the tracker hears only of the last steps.
    deliver_losing(broker, lambda m: m["task"] == TRACK and m["payload"]["event"] not in late)
    saga_id = receipt["saga"]["id"]
    assert Saga.objects.get(id=saga_id).state == "running"
    # Every step it was not told of is owed an event, so each is leased.
    owed = SagaStep.objects.filter(saga_id=saga_id, kind="action").exclude(state="succeeded")
    assert set(owed.values_list("name", flat=True)) == {
        "reserve_stock",
        "charge_payment",
        "approve_order",
        "schedule_shipment",
        "dispatch_shipment",
    }
    assert not owed.filter(deadline_at__isnull=True).exists()

    time_passes(broker)

    assert Saga.objects.get(id=saga_id).state == "completed"
    assert Order.objects.using("orders").get(id=receipt["id"]).status == "shipped"
    assert Charge.objects.using("payments").count() == 1
    assert run_audit() == []


def test_a_saga_first_heard_of_in_its_failure_steps_ends_compensated(alice_api, catalogue, broker):
    receipt = place(alice_api, token="tok_declined")
    # The card is declined and everything is undone, but the tracker hears only the last word.
    deliver_losing(broker, lambda m: m["task"] == TRACK and m["payload"]["event"] != "customer.told")
    saga_id = receipt["saga"]["id"]

    time_passes(broker)

    saga = Saga.objects.get(id=saga_id)
    assert saga.state == "compensated"
    assert saga.failure["code"] == "card_declined"
    assert Order.objects.using("orders").get(id=receipt["id"]).status == "rejected"
    assert mug() == (50, 0)
    assert run_audit() == []


def test_a_cancel_whose_request_to_shipping_was_lost_is_sent_again(alice_api, catalogue, broker, settings):
    settings.SHIPPING_HANDLING_SECONDS = 3600
    receipt = place(alice_api)
    # The order waits out its handling window; the broker loses the dispatch's countdown...
    deliver_losing(broker, lambda m: reaction(m) == "dispatch_shipment:action")
    assert alice_api.post(f"{receipt['url']}cancel/", {}, format="json").status_code == 202
    # ... and then shipping's copy of the cancel request.
    deliver_losing(broker, lambda m: reaction(m) == "dispatch_shipment:compensate")

    time_passes(broker)

    saga = Saga.objects.get(id=receipt["saga"]["id"])
    assert saga.state == "cancelled"
    assert Order.objects.using("orders").get(id=receipt["id"]).status == "cancelled"
    assert Shipment.objects.using("shipping").get().state == "cancelled"
    assert Charge.objects.using("payments").get().state == "refunded"
    assert mug() == (50, 0)
    assert run_audit() == []


def test_an_undo_owed_by_a_step_the_tracker_never_saw_run_is_asked_for(alice_api, catalogue, broker):
    receipt = place(alice_api, token="tok_declined")
    # The tracker misses the reservation, and inventory misses the card's refusal.
    deliver_losing(
        broker,
        lambda m: (
            (m["task"] == TRACK and m["payload"]["event"] in ("order.placed", "stock.reserved"))
            or reaction(m) == "reserve_stock:compensate"
        ),
    )
    assert mug() == (50, 2)  # held, and no one has asked for it back yet

    time_passes(broker)

    saga = Saga.objects.get(id=receipt["saga"]["id"])
    assert (saga.state, saga.failure["code"]) == ("compensated", "card_declined")
    assert mug() == (50, 0)
    assert Order.objects.using("orders").get(id=receipt["id"]).status == "rejected"
    assert run_audit() == []


def test_an_undo_heard_before_its_action_counts_the_action_as_done_and_undone(alice_api, catalogue, broker):
    FaultRule.objects.using("shipping").create(service="shipping", operation="schedule", fail_first=99)
    faults.clear_cache()
    receipt = place(alice_api)
    # Shipping gives up and the approval is revoked, but the tracker never heard of the approval.
    lost = ("payment.captured", "order.approved", "shipment.failed")
    deliver_losing(broker, lambda m: m["task"] == TRACK and m["payload"]["event"] in lost)

    time_passes(broker)  # the leases ask again for the events the tracker missed

    saga_id = receipt["saga"]["id"]
    assert Saga.objects.get(id=saga_id).state == "compensated"
    assert SagaStep.objects.get(saga_id=saga_id, name="approve_order").state == "compensated"
    assert Order.objects.using("orders").get(id=receipt["id"]).status == "rejected"
    assert run_audit() == []


def test_a_reaction_that_gave_up_publishes_its_failure_again_when_nudged(alice_api, catalogue, broker):
    FaultRule.objects.using("payments").create(service="payments", operation="charge", fail_first=99)
    faults.clear_cache()
    receipt = place(alice_api)
    # Payments gives up on the charge (undoing it: a no-op that blocks a late charge) and
    # publishes payment.failed; the broker loses every copy of it.
    deliver_losing(broker, lambda m: m["payload"].get("event") == "payment.failed")
    assert mug() == (50, 2)  # still held: inventory never heard that the payment failed
    FaultRule.objects.using("payments").all().delete()  # the gateway is back: a nudge reaches the barrier
    faults.clear_cache()

    time_passes(broker)

    saga = Saga.objects.get(id=receipt["saga"]["id"])
    assert (saga.state, saga.failure["code"]) == ("compensated", "retries_exhausted")
    assert mug() == (50, 0)
    assert not Charge.objects.using("payments").filter(state="captured").exists()
    assert Order.objects.using("orders").get(id=receipt["id"]).status == "rejected"
    assert run_audit() == []


def test_an_undo_owed_keeps_its_lease_when_the_late_forward_event_arrives(alice_api, catalogue, broker):
    receipt = place(alice_api)
    broker.deliver(limit=1)  # inventory reserves and publishes stock.reserved...
    late = [m for m in broker.queue if m["payload"].get("event") == "stock.reserved"]
    broker.queue = [m for m in broker.queue if m not in late]  # ... which waits in the broker
    assert alice_api.post(f"{receipt['url']}cancel/", {}, format="json").status_code == 202
    # The undo chain runs through payments before its charge (a no-op that blocks the charge),
    # and every copy of payment.refunded is lost.
    deliver_losing(broker, lambda m: m["payload"].get("event") == "payment.refunded")
    broker.queue.extend(late)  # the forward event arrives at last: the charge is refused
    broker.deliver()

    time_passes(broker)

    saga = Saga.objects.get(id=receipt["saga"]["id"])
    assert saga.state == "cancelled"
    assert mug() == (50, 0)
    assert not Charge.objects.using("payments").filter(state="captured").exists()
    assert Order.objects.using("orders").get(id=receipt["id"]).status == "cancelled"
    assert run_audit() == []


def test_a_hold_owed_keeps_its_lease_when_the_booking_is_heard_late(alice_api, catalogue, broker, settings):
    settings.SHIPPING_HANDLING_SECONDS = 3600
    receipt = place(alice_api)
    late = []
    while broker.queue:  # the tracker's news of the booking, and the dispatch's countdown, are late
        message = broker.queue.pop(0)
        if event(message) == "shipment.scheduled" and message["task"] in (TRACK, "shipping.react"):
            late.append(message)
        else:
            broker.run(message)
    assert alice_api.post(f"{receipt['url']}cancel/", {}, format="json").status_code == 202
    # Shipping holds the dispatch (a no-op that blocks it), and every copy of shipment.held is lost.
    deliver_losing(broker, lambda m: event(m) == "shipment.held")
    broker.queue.extend(late)  # the booking is heard at last, and the dispatch is refused
    broker.deliver()

    time_passes(broker)

    assert Saga.objects.get(id=receipt["saga"]["id"]).state == "cancelled"
    assert Shipment.objects.using("shipping").get().state == "cancelled"
    assert Charge.objects.using("payments").get().state == "refunded"
    assert Order.objects.using("orders").get(id=receipt["id"]).status == "cancelled"
    assert mug() == (50, 0)
    assert run_audit() == []
