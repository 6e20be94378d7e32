"""Anti-entropy has no time window: an order whose start message the broker lost is announced
again however long ago that was, backing off with the order's age."""

from __future__ import annotations

from datetime import timedelta

import pytest
from django.core.management import call_command
from django.db.models import F

from orchestration.audit import run_audit
from orchestration.models import Saga
from orders import services
from orders.models import Order
from orders.services import order_reannounce_pending
from sagaplatform.kernel.clock import db_now
from sagaplatform.kernel.models import OutboxMessage
from tests.conftest import mug, order_body

pytestmark = pytest.mark.django_db(transaction=True, databases="__all__")


@pytest.mark.parametrize("mode", ["orchestrated", "choreography"])
def test_an_order_whose_start_was_lost_two_hours_ago_recovers(alice_api, catalogue, broker, monkeypatch, mode):
    response = alice_api.post("/api/orders/", {**order_body(), "mode": mode}, format="json")
    assert response.status_code == 202, response.content
    receipt = response.json()
    broker.queue.clear()  # the broker lost the start (every copy of it) while the platform was down

    hours = timedelta(hours=2)
    monkeypatch.setattr(services, "db_now", lambda alias: db_now(alias) + hours)  # two hours later
    assert order_reannounce_pending() == 1
    broker.queue.clear()  # and, say, the broker lost that one too
    assert order_reannounce_pending() == 0  # not every run: it backs off with the order's age
    hours += timedelta(minutes=29)
    assert order_reannounce_pending() == 0
    hours += timedelta(minutes=2)  # a quarter of its age after the last announcement
    assert order_reannounce_pending() == 1
    broker.deliver()

    assert Saga.objects.get(id=receipt["saga"]["id"]).state == "completed"
    assert Order.objects.using("orders").get(id=receipt["id"]).status == "shipped"
    assert mug() == (48, 0)
    assert run_audit() == []


def test_the_purge_keeps_the_start_message_of_an_order_whose_saga_never_started(alice_api, catalogue, broker):
    response = alice_api.post("/api/orders/", order_body(), format="json")
    receipt = response.json()
    broker.queue.clear()  # lost
    # Ten days later: the start message was published long ago, but no saga has ended with it.
    shift = timedelta(days=10)
    Order.objects.using("orders").update(
        created_at=F("created_at") - shift,
        announced_at=F("announced_at") - shift,
        reannounce_at=F("reannounce_at") - shift,
    )
    OutboxMessage.objects.using("orders").update(published_at=F("published_at") - shift)

    call_command("purge")
    assert order_reannounce_pending() == 1
    broker.deliver()

    assert Saga.objects.get(id=receipt["saga"]["id"]).state == "completed"
    assert Order.objects.using("orders").get(id=receipt["id"]).status == "shipped"
    assert run_audit() == []
