"""Idempotency-Key on POST /api/orders/: races between requests with one key, and expiry.

The simple cases (same key and body, another body, another customer) are in test_orders_api.py.
"""

from __future__ import annotations

import io
import json
import threading
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta

import pytest
from django.core.management import call_command
from django.db import connections
from django.db.models import F
from rest_framework.test import APIClient

from orders import services
from orders.models import IdempotencyKey, Order, OrderLine
from sagaplatform.kernel.models import OutboxMessage
from tests.conftest import order_body

pytestmark = pytest.mark.django_db(databases="__all__")

URL = "/api/orders/"
THREADS = 12
TTL = 24 * 3600


def post(user, body: dict, key: str):
    api = APIClient()
    api.force_authenticate(user)
    return api.post(URL, json.dumps(body), content_type="application/json", HTTP_IDEMPOTENCY_KEY=key)


def rows() -> dict[str, int]:
    return {
        "orders": Order.objects.using("orders").count(),
        "lines": OrderLine.objects.using("orders").count(),
        "keys": IdempotencyKey.objects.using("orders").count(),
        "outbox": OutboxMessage.objects.using("orders").count(),  # two an order: start, card
    }


def all_at_once(count: int, request):
    """Run `request(i)` in `count` threads released together by a barrier; their answers."""
    start = threading.Barrier(count, timeout=30)

    def run(i):
        try:
            start.wait()
            response = request(i)
            return response.status_code, response.json(), response.get("Idempotent-Replayed")
        finally:
            connections.close_all()

    with ThreadPoolExecutor(max_workers=count) as pool:
        return list(pool.map(run, range(count)))


def age_keys(seconds: float) -> None:
    IdempotencyKey.objects.using("orders").update(created_at=F("created_at") - timedelta(seconds=seconds))


# --- races -------------------------------------------------------------------------------------


@pytest.mark.django_db(transaction=True, databases="__all__")
@pytest.mark.parametrize("attempt", range(3))
def test_concurrent_requests_with_one_key_place_exactly_one_order(alice, catalogue, broker, attempt):
    """A client retrying on a timeout, many times at once: one order, and every answer is that
    order (first or replayed) or a 409 telling it to try again; never a second order."""
    answers = all_at_once(THREADS, lambda i: post(alice, order_body(), key=f"order-{attempt}"))

    order = Order.objects.using("orders").get()
    first = [body for status, body, replayed in answers if status == 202 and replayed is None]
    replays = [body for status, body, replayed in answers if status == 202 and replayed == "true"]
    refused = [body for status, body, _ in answers if status == 409]
    assert len(first) == 1
    assert first[0]["id"] == str(order.id)
    assert all(body == first[0] for body in replays)
    assert all(body["code"] == "idempotency_key_in_flight" for body in refused)
    assert len(first) + len(replays) + len(refused) == THREADS
    assert rows() == {"orders": 1, "lines": 1, "keys": 1, "outbox": 2}
    assert [m["task"] for m in broker.queue] == ["orchestration.start_saga", "payments.register_payment_method"]


@pytest.mark.django_db(transaction=True, databases="__all__")
def test_concurrent_requests_with_one_key_and_two_bodies_place_the_first_one(alice, catalogue, broker):
    two_mugs = order_body(items=[{"sku": "SKU-MUG", "quantity": 2}])
    a_book = order_body(items=[{"sku": "SKU-BOOK", "quantity": 1}])
    bodies = [two_mugs if i % 2 else a_book for i in range(THREADS)]

    answers = all_at_once(THREADS, lambda i: post(alice, bodies[i], key="order-123"))

    order = Order.objects.using("orders").get()
    winner = bodies[next(i for i, (status, _, replayed) in enumerate(answers) if status == 202 and not replayed)]
    for i, (status, body, _) in enumerate(answers):
        if status == 202:
            assert body["id"] == str(order.id)
            assert bodies[i] == winner
        elif status == 422:
            assert body["code"] == "idempotency_key_reused"
            assert bodies[i] != winner
        else:
            assert (status, body["code"]) == (409, "idempotency_key_in_flight")
    assert [line.sku for line in order.lines.all()] == [winner["items"][0]["sku"]]
    assert rows() == {"orders": 1, "lines": 1, "keys": 1, "outbox": 2}


@pytest.fixture
def held_in_flight(monkeypatch):
    """The first order placed stops inside its transaction (key taken, nothing committed) until
    `release` is set; `inside` is set once it got there."""
    inside, release = threading.Event(), threading.Event()
    create = services._create
    calls = []

    def slow_create(**kwargs):
        calls.append(kwargs)
        if len(calls) == 1:
            inside.set()
            assert release.wait(30)
        return create(**kwargs)

    monkeypatch.setattr(services, "_create", slow_create)
    yield inside, release
    release.set()


@pytest.mark.postgres
@pytest.mark.django_db(transaction=True, databases="__all__")
def test_a_request_while_the_first_with_its_key_is_in_flight_is_409(alice, bob, catalogue, broker, held_in_flight):
    inside, release = held_in_flight
    with ThreadPoolExecutor(max_workers=1) as pool:
        first = pool.submit(lambda: (post(alice, order_body(), key="order-123"), connections.close_all())[0])
        assert inside.wait(30)

        meanwhile = post(alice, order_body(), key="order-123")
        # Not a lock on every key: another key, or another customer's same key, goes through.
        other_key = post(alice, order_body(), key="order-456")
        other_customer = post(bob, order_body(), key="order-123")

        assert meanwhile.status_code == 409
        assert meanwhile.json() == {
            "code": "idempotency_key_in_flight",
            "message": "A request with this Idempotency-Key is still being processed; retry in a moment",
            "details": {"idempotency_key": "order-123"},
        }
        assert other_key.status_code == other_customer.status_code == 202
        assert (
            not Order.objects.using("orders").filter(customer_id=alice.id).exclude(id=other_key.json()["id"]).exists()
        )
        release.set()
        placed = first.result(timeout=30)

    assert placed.status_code == 202
    assert "Idempotent-Replayed" not in placed
    again = post(alice, order_body(), key="order-123")
    assert (again.status_code, again["Idempotent-Replayed"], again.json()) == (202, "true", placed.json())
    assert rows() == {"orders": 3, "lines": 3, "keys": 3, "outbox": 6}


# --- expiry ------------------------------------------------------------------------------------


def test_a_key_is_remembered_until_it_expires(alice, catalogue, broker):
    first = post(alice, order_body(), key="order-123")
    age_keys(TTL - 60)

    again = post(alice, order_body(), key="order-123")

    assert again["Idempotent-Replayed"] == "true"
    assert again.json() == first.json()
    assert rows()["orders"] == 1


def test_an_expired_key_places_a_new_order_and_the_old_order_stays(alice, catalogue, broker):
    first = post(alice, order_body(), key="order-123")
    age_keys(TTL + 1)

    # Even with another body: the expired key is forgotten, not compared.
    again = post(alice, order_body(items=[{"sku": "SKU-BOOK", "quantity": 1}]), key="order-123")

    assert again.status_code == 202
    assert "Idempotent-Replayed" not in again
    assert again.json()["id"] != first.json()["id"]
    key = IdempotencyKey.objects.using("orders").get()
    assert str(key.order_id) == again.json()["id"]
    assert Order.objects.using("orders").filter(id=first.json()["id"]).exists()
    assert rows() == {"orders": 2, "lines": 2, "keys": 1, "outbox": 4}
    # And the new key is remembered in turn.
    assert post(alice, order_body(items=[{"sku": "SKU-BOOK", "quantity": 1}]), key="order-123").json() == again.json()


def test_the_time_to_live_is_a_setting(alice, catalogue, broker, settings):
    settings.IDEMPOTENCY_KEY_TTL = 60
    first = post(alice, order_body(), key="order-123")
    age_keys(61)

    again = post(alice, order_body(), key="order-123")

    assert again.json()["id"] != first.json()["id"]


def test_the_purge_deletes_expired_keys_only_and_keeps_their_orders(alice, bob, catalogue, broker):
    post(alice, order_body(), key="old-1")
    post(bob, order_body(), key="old-2")
    age_keys(TTL + 1)
    recent = post(alice, order_body(), key="recent")

    out = io.StringIO()
    call_command("purge_idempotency_keys", stdout=out)

    assert out.getvalue().startswith("purged 2 idempotency keys")
    assert list(IdempotencyKey.objects.using("orders").values_list("key", flat=True)) == ["recent"]
    assert Order.objects.using("orders").count() == 3
    assert post(alice, order_body(), key="recent").json() == recent.json()
    assert services.idempotency_keys_purge() == 0
