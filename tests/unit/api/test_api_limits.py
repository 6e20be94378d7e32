"""Limits on what a client can send: order placement throttling and the request size limit."""

from __future__ import annotations

import io
import json

import pytest
from rest_framework.test import APIClient

from orders.models import Order
from sagaplatform.kernel.models import OutboxMessage
from tests.conftest import order_body

pytestmark = pytest.mark.django_db(databases="__all__")

URL = "/api/orders/"


def orders() -> int:
    return Order.objects.using("orders").count()


@pytest.fixture
def three_a_minute(settings):
    settings.REST_FRAMEWORK = {
        **settings.REST_FRAMEWORK,
        "DEFAULT_THROTTLE_RATES": {**settings.REST_FRAMEWORK["DEFAULT_THROTTLE_RATES"], "orders_create": "3/minute"},
    }


def test_the_default_rate_is_60_orders_a_minute_per_user(alice_api, bob_api, catalogue, broker):
    answers = [alice_api.post(URL, order_body(), format="json").status_code for _ in range(61)]

    assert answers == [202] * 60 + [429]
    assert orders() == 60
    assert bob_api.post(URL, order_body(), format="json").status_code == 202


def test_placing_orders_beyond_the_rate_is_a_429_with_retry_after_and_places_nothing(
    alice_api, catalogue, broker, three_a_minute
):
    for _ in range(3):
        assert alice_api.post(URL, order_body(), format="json").status_code == 202

    response = alice_api.post(URL, order_body(), format="json", HTTP_IDEMPOTENCY_KEY="fourth")

    assert response.status_code == 429
    error = response.json()
    assert (error["code"], set(error)) == ("throttled", {"code", "message", "details"})
    assert 0 < error["details"]["retry_after"] <= 60
    assert response["Retry-After"] == str(error["details"]["retry_after"])
    assert orders() == 3
    assert OutboxMessage.objects.using("orders").count() == 6  # two an order: the start and the card


def test_the_rate_counts_per_user_and_only_placements(alice_api, bob_api, catalogue, broker, three_a_minute):
    for _ in range(3):
        alice_api.post(URL, order_body(), format="json")

    assert alice_api.post(URL, order_body(), format="json").status_code == 429
    # Reading and cancelling are not placements; another customer has their own count.
    assert alice_api.get(URL).status_code == 200
    assert alice_api.get("/api/inventory/").status_code == 200
    receipt = bob_api.post(URL, order_body(), format="json")
    assert receipt.status_code == 202
    assert bob_api.post(f"{receipt.json()['url']}cancel/", {}, format="json").status_code == 202


def test_the_rate_is_read_from_the_settings_at_each_request(alice_api, catalogue, broker, settings):
    settings.REST_FRAMEWORK = {
        **settings.REST_FRAMEWORK,
        "DEFAULT_THROTTLE_RATES": {**settings.REST_FRAMEWORK["DEFAULT_THROTTLE_RATES"], "orders_create": "1/hour"},
    }

    assert alice_api.post(URL, order_body(), format="json").status_code == 202
    throttled = alice_api.post(URL, order_body(), format="json")

    assert throttled.status_code == 429
    assert int(throttled["Retry-After"]) > 60


def test_a_bad_rate_in_the_environment_fails_at_start(monkeypatch):
    from django.core.exceptions import ImproperlyConfigured

    from sagaplatform.settings import env_rate

    monkeypatch.setenv("API_THROTTLE_ORDERS_CREATE", "sixty")
    with pytest.raises(ImproperlyConfigured, match="API_THROTTLE_ORDERS_CREATE"):
        env_rate("API_THROTTLE_ORDERS_CREATE", "60/minute")
    monkeypatch.setenv("API_THROTTLE_ORDERS_CREATE", "600/hour")
    assert env_rate("API_THROTTLE_ORDERS_CREATE", "60/minute") == "600/hour"


# --- request size ------------------------------------------------------------------------------


def padded_order(size: int) -> bytes:
    """A valid order (but for line2's length) whose JSON is exactly `size` bytes."""
    body = order_body()
    body["shipping_address"]["line2"] = ""
    bare = len(json.dumps(body).encode())
    body["shipping_address"]["line2"] = "x" * (size - bare)
    raw = json.dumps(body).encode()
    assert len(raw) == size
    return raw


def test_a_body_over_64_kb_is_a_413_and_places_nothing(alice_api, catalogue, broker):
    response = alice_api.post(URL, padded_order(64 * 1024 + 1), content_type="application/json")

    assert response.status_code == 413
    assert response.json() == {
        "code": "request_too_large",
        "message": "The request body is larger than 65536 bytes.",
        "details": {},
    }
    assert orders() == 0


def test_a_body_of_exactly_64_kb_is_read_and_validated(alice_api, catalogue, broker):
    response = alice_api.post(URL, padded_order(64 * 1024), content_type="application/json")

    assert response.status_code == 400  # read in full, then refused by validation: line2 is too long
    assert "shipping_address" in response.json()["details"]


def test_a_body_longer_than_its_declared_length_is_cut_at_the_declared_length(alice_api, catalogue, broker):
    # What the server reads is bounded by Content-Length, so an understated length cannot smuggle
    # a large body in: the truncated JSON is malformed.
    raw = padded_order(100_000)

    response = alice_api.generic("POST", URL, raw, content_type="application/json", CONTENT_LENGTH="1000")

    assert (response.status_code, response.json()["code"]) == (400, "malformed_request")
    assert orders() == 0


def test_the_limit_is_a_setting(alice_api, catalogue, broker, settings):
    settings.DATA_UPLOAD_MAX_MEMORY_SIZE = 1000

    response = alice_api.post(URL, padded_order(1001), content_type="application/json")

    assert response.status_code == 413
    assert response.json()["message"] == "The request body is larger than 1000 bytes."


@pytest.mark.parametrize("path", ["/api/orders/{order}/cancel/", "/api/sagas/{saga}/cancel/", "/api/faults/"])
def test_every_body_is_limited(admin_user, alice_api, catalogue, broker, path):
    order = alice_api.post(URL, order_body(), format="json").json()
    api = APIClient()
    api.force_authenticate(admin_user)
    url = path.format(order=order["id"], saga=order["saga"]["id"])
    client = alice_api if "orders" in path else api

    response = client.post(url, json.dumps({"reason": "x" * 70_000}), content_type="application/json")

    assert response.status_code == 413
    assert response.json()["code"] == "request_too_large"


def test_a_body_whose_length_was_not_declared_is_measured_as_it_is_read():
    # Chunked bodies have no Content-Length for Django to check before reading: the parser counts.
    from sagaplatform.api import RequestTooLarge
    from sagaplatform.parsers import JSONParser

    with pytest.raises(RequestTooLarge):
        JSONParser().parse(io.BytesIO(padded_order(64 * 1024 + 1)))
    assert JSONParser().parse(io.BytesIO(padded_order(64 * 1024)))["items"] == order_body()["items"]


class BrokenCache:
    """A cache whose server is down, as Django's Redis backend behaves then."""

    def get(self, *args, **kwargs):
        raise ConnectionError("Error 111 connecting to 127.0.0.1:6379. Connection refused.")

    set = get


def test_orders_are_still_accepted_when_the_rate_limit_cache_is_down(alice_api, catalogue, broker, monkeypatch):
    from sagaplatform.api import ScopedThrottle

    monkeypatch.setattr(ScopedThrottle, "cache", BrokenCache())

    response = alice_api.post(URL, order_body(), format="json")

    assert response.status_code == 202
    assert orders() == 1
