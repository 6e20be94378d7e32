"""The web process under load, in-process: admission refuses orders past ORDERS_MAX_PENDING,
the concurrency limit answers 503 at the door, and a page whose database is down is a 503 with
Retry-After, never a 500. The real web process and the ramp: tests/e2e/test_web_load_stack.py."""

from __future__ import annotations

import asyncio
import json
from datetime import timedelta

import pytest
from django.conf import settings
from django.db import connections
from django.utils import timezone

from orders.models import IdempotencyKey, Order
from orders.services import order_approve
from sagaplatform.kernel.models import OutboxMessage
from sagaplatform.overload import ConcurrencyLimit
from tests.conftest import order_body
from tests.processes import free_port

URL = "/api/orders/"


def orders() -> int:
    return Order.objects.using("orders").count()


# --- Admission, in-process ------------------------------------------------------------------


@pytest.mark.django_db(databases="__all__")
def test_orders_past_the_pending_limit_are_refused_with_503_and_retry_after_and_write_nothing(
    alice_api, catalogue, broker, settings
):
    settings.ORDERS_MAX_PENDING = 2
    first = alice_api.post(URL, order_body(), format="json", HTTP_IDEMPOTENCY_KEY="first")
    assert first.status_code == 202
    assert alice_api.post(URL, order_body(), format="json").status_code == 202

    refused = alice_api.post(URL, order_body(), format="json", HTTP_IDEMPOTENCY_KEY="third")

    assert refused.status_code == 503
    assert refused.json() == {
        "code": "overloaded",
        "message": "Too many orders are in progress; retry in a moment",
        "details": {"retry_after": settings.API_RETRY_AFTER},
    }
    assert refused["Retry-After"] == str(settings.API_RETRY_AFTER)
    assert orders() == 2
    assert OutboxMessage.objects.using("orders").count() == 4  # two an order: the start and the card
    assert list(IdempotencyKey.objects.using("orders").values_list("key", flat=True)) == ["first"]
    # A replay is not new work: it is answered whatever the load.
    replay = alice_api.post(URL, order_body(), format="json", HTTP_IDEMPOTENCY_KEY="first")
    assert (replay.status_code, replay["Idempotent-Replayed"]) == (202, "true")
    # Once a saga has decided an order, there is room for one more.
    order_approve(order_id=first.json()["id"])
    assert alice_api.post(URL, order_body(), format="json", HTTP_IDEMPOTENCY_KEY="third").status_code == 202
    assert orders() == 3


@pytest.mark.django_db(databases="__all__")
def test_orders_pending_for_over_an_hour_are_not_work_in_flight(alice_api, catalogue, broker, settings):
    settings.ORDERS_MAX_PENDING = 1
    assert alice_api.post(URL, order_body(), format="json").status_code == 202
    assert alice_api.post(URL, order_body(), format="json").status_code == 503

    # A parked saga's order stays pending, and is announced no more after an hour.
    Order.objects.using("orders").update(announced_at=timezone.now() - timedelta(hours=2))

    assert alice_api.post(URL, order_body(), format="json").status_code == 202


# --- The door: a concurrency limit before Django ----------------------------------------------


def test_past_the_concurrency_limit_requests_are_answered_503_at_once_and_websockets_pass():
    release = asyncio.Event()
    entered = []

    async def app(scope, receive, send):
        entered.append(scope["type"])
        await release.wait()
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"{}"})

    limited = ConcurrencyLimit(app, limit=2, retry_after=7)

    async def request(scope_type: str = "http") -> list[dict]:
        sent = []

        async def send(message):
            sent.append(message)

        await limited({"type": scope_type}, None, send)
        return sent

    async def scenario():
        slow = [asyncio.create_task(request()) for _ in range(2)]
        websocket = asyncio.create_task(request("websocket"))
        while len(entered) < 3:
            await asyncio.sleep(0)
        refused = await asyncio.wait_for(request(), timeout=1)  # answered without waiting
        release.set()
        answered = await asyncio.gather(*slow, websocket)
        return refused, answered, await request()

    refused, answered, after = asyncio.run(scenario())

    start, body = refused
    assert start["status"] == 503
    assert dict(start["headers"])[b"retry-after"] == b"7"
    assert json.loads(body["body"]) == {
        "code": "overloaded",
        "message": "The server is busy; retry in a moment.",
        "details": {"retry_after": 7},
    }
    assert [sent[0]["status"] for sent in answered] == [200, 200, 200]
    assert after[0]["status"] == 200  # the slots are free again
    assert entered == ["http", "http", "websocket", "http"]


@pytest.mark.postgres
@pytest.mark.django_db(transaction=True, databases="__all__")
def test_a_page_whose_database_is_down_is_a_503_with_retry_after(alice, client):
    client.force_login(alice)
    orders_db = connections["orders"]
    port = orders_db.settings_dict["PORT"]
    orders_db.close()
    orders_db.settings_dict["PORT"] = str(free_port())  # nothing listens there
    try:
        page = client.get("/orders/")
    finally:
        orders_db.close()
        orders_db.settings_dict["PORT"] = port

    assert page.status_code == 503
    assert page["Retry-After"] == str(settings.API_RETRY_AFTER)
    assert "try again in a moment" in page.content.decode()
