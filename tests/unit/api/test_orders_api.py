"""The orders and inventory REST API: validation, errors, ownership and idempotency keys.

Concurrent requests with one key, and key expiry, are in test_api_idempotency.py."""

from __future__ import annotations

import json
import uuid
from decimal import Decimal

import pytest
from rest_framework.test import APIClient

from inventory.services import reservation_reserve
from orders.models import IdempotencyKey, Order, OrderLine, OrderStatusChange, Product
from sagaplatform.kernel.models import OutboxMessage
from tests.conftest import order_body

pytestmark = pytest.mark.django_db(databases="__all__")

URL = "/api/orders/"
ERROR_KEYS = {"code", "message", "details"}


def rows() -> dict[str, int]:
    """Everything placing an order writes on the orders database."""
    return {
        "orders": Order.objects.using("orders").count(),
        "lines": OrderLine.objects.using("orders").count(),
        "history": OrderStatusChange.objects.using("orders").count(),
        "keys": IdempotencyKey.objects.using("orders").count(),
        "outbox": OutboxMessage.objects.using("orders").count(),
    }


NOTHING = {"orders": 0, "lines": 0, "history": 0, "keys": 0, "outbox": 0}


def post_json(api: APIClient, body, *, key: str | None = None):
    raw = body if isinstance(body, bytes) else json.dumps(body)
    headers = {"HTTP_IDEMPOTENCY_KEY": key} if key else {}
    return api.post(URL, raw, content_type="application/json", **headers)


def assert_error(response, status: int, code: str | None = None) -> dict:
    assert response.status_code == status, response.content
    assert response["Content-Type"].startswith("application/json")
    error = response.json()
    assert set(error) == ERROR_KEYS
    assert isinstance(error["message"], str)
    assert error["message"]
    if code is not None:
        assert error["code"] == code
    return error


def with_items(*items) -> dict:
    return {**order_body(), "items": list(items)}


def without(field: str) -> dict:
    body = order_body()
    del body[field]
    return body


def with_field(field: str, value) -> dict:
    return {**order_body(), field: value}


def with_address(**changes) -> dict:
    body = order_body()
    body["shipping_address"] = {**body["shipping_address"], **changes}
    return body


MUG = "SKU-MUG"

INVALID_BODIES = [
    pytest.param(with_items({"sku": MUG, "quantity": 0}), "invalid_request", "items", id="quantity-zero"),
    pytest.param(with_items({"sku": MUG, "quantity": -1}), "invalid_request", "items", id="quantity-negative"),
    pytest.param(with_items({"sku": MUG, "quantity": 10**9}), "invalid_request", "items", id="quantity-huge"),
    pytest.param(with_items({"sku": MUG, "quantity": 1001}), "invalid_request", "items", id="quantity-over-max"),
    pytest.param(with_items({"sku": MUG, "quantity": 2.5}), "invalid_request", "items", id="quantity-float"),
    pytest.param(with_items({"sku": MUG, "quantity": 2.0}), "invalid_request", "items", id="quantity-float-integral"),
    pytest.param(with_items({"sku": MUG, "quantity": "3"}), "invalid_request", "items", id="quantity-string"),
    pytest.param(with_items({"sku": MUG, "quantity": True}), "invalid_request", "items", id="quantity-bool"),
    pytest.param(with_items({"sku": MUG, "quantity": None}), "invalid_request", "items", id="quantity-null"),
    pytest.param(with_items({"sku": MUG}), "invalid_request", "items", id="quantity-missing"),
    pytest.param(with_items({"sku": "SKU-NOPE", "quantity": 1}), "unknown_sku", None, id="unknown-sku"),
    pytest.param(
        with_items({"sku": MUG, "quantity": 1}, {"sku": "SKU-NOPE", "quantity": 1}),
        "unknown_sku",
        None,
        id="unknown-sku-among-known",
    ),
    pytest.param(
        with_items({"sku": MUG, "quantity": 1}, {"sku": MUG, "quantity": 2}),
        "invalid_request",
        "items",
        id="duplicate-sku",
    ),
    pytest.param(with_items(), "invalid_request", "items", id="items-empty"),
    pytest.param(without("items"), "invalid_request", "items", id="items-missing"),
    pytest.param(without("payment"), "invalid_request", "payment", id="payment-missing"),
    pytest.param(without("shipping_address"), "invalid_request", "shipping_address", id="address-missing"),
    pytest.param(with_field("items", {"sku": MUG, "quantity": 1}), "invalid_request", "items", id="items-dict"),
    pytest.param(with_field("items", "SKU-MUG"), "invalid_request", "items", id="items-string"),
    pytest.param(with_field("payment", "tok_visa"), "invalid_request", "payment", id="payment-string"),
    pytest.param(with_field("shipping_address", "Paris"), "invalid_request", "shipping_address", id="address-string"),
    pytest.param(with_field("payment", {"token": "visa"}), "invalid_request", "payment", id="token-no-prefix"),
    pytest.param(
        with_field("payment", {"token": "tok_visa; DROP"}), "invalid_request", "payment", id="token-bad-chars"
    ),
    pytest.param(
        with_field("payment", {"token": "tok_" + "x" * 80}), "invalid_request", "payment", id="token-too-long"
    ),
    pytest.param(with_field("payment", {"token": 4242}), "invalid_request", "payment", id="token-number"),
    pytest.param(with_address(country="FRA"), "invalid_request", "shipping_address", id="country-alpha3"),
    pytest.param(with_address(country="fr"), "invalid_request", "shipping_address", id="country-lowercase"),
    pytest.param(with_address(country="France"), "invalid_request", "shipping_address", id="country-name"),
    pytest.param(with_address(country=""), "invalid_request", "shipping_address", id="country-empty"),
    pytest.param(with_address(country="XX"), "invalid_request", "shipping_address", id="country-unassigned"),
    pytest.param(with_address(phone="0612345678"), "invalid_request", "shipping_address", id="phone-not-e164"),
    pytest.param([order_body()], "invalid_request", None, id="json-array"),
    pytest.param("an order", "invalid_request", None, id="json-string"),
    pytest.param(b"{not json", "malformed_request", None, id="not-json"),
    pytest.param(b'{"items": [', "malformed_request", None, id="truncated-json"),
    pytest.param(b"\xff\xfe\x00garbage", "malformed_request", None, id="not-utf8"),
]


# --- validation --------------------------------------------------------------------------------


def test_a_country_that_is_not_an_iso_code_is_refused_with_a_clear_message(alice_api, catalogue, broker):
    response = post_json(alice_api, with_address(country="Germany"), key="attempt-1")

    error = assert_error(response, 400, "invalid_request")
    [message] = error["details"]["shipping_address"]["country"]
    assert (
        message
        == '"Germany" is not an ISO 3166-1 country code: use its two capital letters, for example DE for Germany.'
    )
    assert post_json(alice_api, with_address(country="DE"), key="attempt-2").status_code == 202


@pytest.mark.parametrize(("body", "code", "field"), INVALID_BODIES)
def test_an_invalid_order_is_refused_with_400_and_nothing_is_written(alice_api, catalogue, broker, body, code, field):
    response = post_json(alice_api, body, key="attempt-1")

    error = assert_error(response, 400, code)
    if field is not None:
        assert field in error["details"]
    assert rows() == NOTHING
    assert broker.queue == []


def test_an_unknown_sku_names_every_unknown_sku(alice_api, catalogue, broker):
    body = with_items({"sku": "SKU-ZED", "quantity": 1}, {"sku": MUG, "quantity": 1}, {"sku": "SKU-ABC", "quantity": 1})

    error = assert_error(post_json(alice_api, body), 400, "unknown_sku")

    assert error["details"] == {"unknown_skus": ["SKU-ABC", "SKU-ZED"]}
    assert rows() == NOTHING


def test_an_inactive_product_cannot_be_ordered(alice_api, catalogue, broker):
    Product.objects.using("orders").filter(sku=MUG).update(is_active=False)

    error = assert_error(post_json(alice_api, order_body()), 400, "unknown_sku")

    assert error["details"] == {"unknown_skus": [MUG]}
    assert rows() == NOTHING


@pytest.fixture
def big_catalogue(catalogue) -> list[str]:
    skus = [f"SKU-{i:03d}" for i in range(51)]
    Product.objects.using("orders").bulk_create(
        [Product(sku=sku, name=sku, unit_price=Decimal("1.00")) for sku in skus]
    )
    return skus


def test_fifty_one_lines_are_too_many(alice_api, big_catalogue, broker):
    body = with_items(*({"sku": sku, "quantity": 1} for sku in big_catalogue))

    error = assert_error(post_json(alice_api, body), 400, "invalid_request")

    assert "items" in error["details"]
    assert rows() == NOTHING


def test_fifty_lines_and_the_largest_quantity_are_accepted(alice_api, big_catalogue, broker):
    lines = [{"sku": sku, "quantity": 1} for sku in big_catalogue[:49]] + [{"sku": big_catalogue[49], "quantity": 1000}]

    response = post_json(alice_api, with_items(*lines))

    assert response.status_code == 202, response.content
    order = Order.objects.using("orders").get()
    assert order.lines.count() == 50
    assert order.total == Decimal("1049.00")


def test_an_overlong_idempotency_key_is_refused(alice_api, catalogue, broker):
    assert_error(post_json(alice_api, order_body(), key="k" * 256), 400)

    assert rows() == NOTHING


def test_a_100_kb_body_is_refused_without_a_server_error(alice_api, catalogue, broker):
    body = order_body()
    body["shipping_address"]["line2"] = "x" * 100_000  # otherwise a valid order

    response = post_json(alice_api, body)

    assert_error(response, 413, "request_too_large")
    assert rows() == NOTHING


@pytest.mark.parametrize(
    "raw",
    [
        pytest.param(b"[" * 2000 + b"]" * 2000, id="nested-arrays"),
        pytest.param(b'{"items": ' + b"[" * 5000 + b"]" * 5000 + b"}", id="nested-items"),
    ],
)
def test_deeply_nested_json_is_a_400_not_a_server_error(alice, catalogue, broker, raw):
    api = APIClient(raise_request_exception=False)
    api.force_authenticate(alice)

    response = post_json(api, raw)

    assert_error(response, 400, "malformed_request")
    assert rows() == NOTHING


def test_an_order_whose_total_cannot_be_stored_is_refused(alice, catalogue, broker):
    Product.objects.using("orders").create(sku="SKU-YACHT", name="Yacht", unit_price=Decimal("99999999.99"))
    api = APIClient(raise_request_exception=False)
    api.force_authenticate(alice)

    response = post_json(api, order_body(items=[{"sku": "SKU-YACHT", "quantity": 1000}]))

    assert_error(response, 400)
    assert rows() == NOTHING


def test_an_anonymous_client_gets_401_with_the_error_shape(catalogue, broker):
    anonymous = APIClient()

    response = post_json(anonymous, order_body())

    assert_error(response, 401, "not_authenticated")
    assert rows() == NOTHING
    assert_error(anonymous.get(URL), 401, "not_authenticated")


# --- placing and reading -----------------------------------------------------------------------


def test_a_valid_order_is_accepted_pending_with_its_saga(alice_api, alice, catalogue, broker):
    response = post_json(alice_api, order_body(items=[{"sku": MUG, "quantity": 2}, {"sku": "SKU-BOOK", "quantity": 1}]))

    assert response.status_code == 202, response.content
    receipt = response.json()
    order = Order.objects.using("orders").get()
    assert receipt == {
        "id": str(order.id),
        "status": "pending",
        "saga": {"id": str(order.saga_id), "state": "pending"},
        "url": f"/api/orders/{order.id}/",
    }
    assert response["Location"] == receipt["url"]
    assert "Idempotent-Replayed" not in response
    assert (order.customer_id, order.total, order.status) == (alice.id, Decimal("69.00"), "pending")
    assert sorted(order.lines.values_list("sku", "quantity", "unit_price")) == [
        ("SKU-BOOK", 1, Decimal("44.00")),
        (MUG, 2, Decimal("12.50")),
    ]
    # The start, and the card's registration with payments (sealed: the token is not in it).
    assert rows() == {"orders": 1, "lines": 2, "history": 1, "keys": 0, "outbox": 2}
    start, registration = OutboxMessage.objects.using("orders").order_by("created_at", "task")
    assert (start.task, start.queue) == ("orchestration.start_saga", "orchestrator")
    assert (registration.task, registration.queue) == ("payments.register_payment_method", "payments")
    assert registration.payload["reference"] == start.payload["context"]["payment_method"]
    assert "tok_visa" not in json.dumps(registration.payload)
    assert start.payload["saga_id"] == str(order.saga_id)
    assert start.payload["context"]["amount"] == "69.00"


def test_another_customer_gets_404_for_my_order(alice_api, bob_api, catalogue, broker):
    receipt = post_json(alice_api, order_body()).json()

    assert_error(bob_api.get(receipt["url"]), 404, "not_found")
    assert alice_api.get(receipt["url"]).status_code == 200


def test_an_unknown_order_id_is_404(alice_api, catalogue):
    assert_error(alice_api.get(f"{URL}{uuid.uuid4()}/"), 404, "not_found")


def test_a_malformed_order_id_is_a_json_404(alice_api, catalogue):
    assert_error(alice_api.get(f"{URL}not-a-uuid/"), 404, "not_found")


def test_the_order_list_shows_only_my_orders(alice_api, bob_api, catalogue, broker):
    mine = {post_json(alice_api, order_body()).json()["id"] for _ in range(2)}
    theirs = post_json(bob_api, order_body()).json()["id"]

    listed = alice_api.get(URL)

    assert listed.status_code == 200
    assert listed.json()["count"] == 2
    assert {o["id"] for o in listed.json()["results"]} == mine
    assert [o["id"] for o in bob_api.get(URL).json()["results"]] == [theirs]
    assert set(listed.json()["results"][0]) == {"id", "status", "mode", "total", "currency", "created_at", "url"}


def test_the_order_list_filters_by_status_and_style(alice_api, catalogue, broker):
    orchestrated = post_json(alice_api, order_body()).json()["id"]
    tcc = post_json(alice_api, {**order_body(), "mode": "tcc"}).json()["id"]
    rejected = post_json(alice_api, order_body()).json()["id"]
    Order.objects.using("orders").filter(id=rejected).update(status="rejected")

    def listed(query):
        response = alice_api.get(f"{URL}?{query}")
        assert response.status_code == 200, response.content
        return {o["id"] for o in response.json()["results"]}

    assert listed("status=pending") == {orchestrated, tcc}
    assert listed("status=rejected&status=pending") == {orchestrated, tcc, rejected}
    assert listed("mode=tcc") == {tcc}
    assert listed("status=shipped") == set()
    assert_error(alice_api.get(f"{URL}?status=lost"), 400, "invalid_request")


def test_the_order_list_is_paginated(alice_api, catalogue, broker):
    ids = [post_json(alice_api, order_body()).json()["id"] for _ in range(3)]

    first = alice_api.get(f"{URL}?page_size=2").json()
    second = alice_api.get(f"{URL}?page_size=2&page=2").json()

    assert first["count"] == 3
    assert [o["id"] for o in first["results"] + second["results"]] == list(reversed(ids))
    assert second["next"] is None


# --- idempotency keys --------------------------------------------------------------------------


@pytest.mark.django_db(transaction=True, databases="__all__")
def test_the_same_key_and_body_return_the_same_order_once(alice_api, catalogue, broker):
    first = post_json(alice_api, order_body(), key="order-123")
    second = post_json(alice_api, order_body(), key="order-123")

    assert first.status_code == second.status_code == 202
    assert "Idempotent-Replayed" not in first
    assert second["Idempotent-Replayed"] == "true"
    assert second.json() == first.json()
    assert second["Location"] == first["Location"]
    assert rows() == {"orders": 1, "lines": 1, "history": 1, "keys": 1, "outbox": 2}
    # One saga started: the replay publishes nothing.
    assert [m["task"] for m in broker.queue] == ["orchestration.start_saga", "payments.register_payment_method"]


def test_the_same_body_in_another_key_order_is_still_a_replay(alice_api, catalogue, broker):
    body = order_body()
    reordered = {key: body[key] for key in reversed(list(body))}
    reordered["shipping_address"] = dict(reversed(list(body["shipping_address"].items())))

    first = post_json(alice_api, body, key="order-123")
    second = alice_api.post(
        URL, json.dumps(reordered, indent=2), content_type="application/json", HTTP_IDEMPOTENCY_KEY="order-123"
    )

    assert second.status_code == 202
    assert second["Idempotent-Replayed"] == "true"
    assert second.json()["id"] == first.json()["id"]
    assert rows()["orders"] == 1


def test_the_same_key_with_another_body_is_422(alice_api, catalogue, broker):
    first = post_json(alice_api, order_body(), key="order-123")
    before = rows()

    response = post_json(alice_api, order_body(items=[{"sku": MUG, "quantity": 3}]), key="order-123")

    error = assert_error(response, 422, "idempotency_key_reused")
    assert error["details"] == {"idempotency_key": "order-123"}
    assert rows() == before
    assert Order.objects.using("orders").get().id == uuid.UUID(first.json()["id"])
    assert OrderLine.objects.using("orders").get().quantity == 2


def test_another_customer_may_use_the_same_key(alice_api, bob_api, alice, bob, catalogue, broker):
    alices = post_json(alice_api, order_body(), key="order-123")
    bobs = post_json(bob_api, order_body(), key="order-123")

    assert alices.status_code == bobs.status_code == 202
    assert "Idempotent-Replayed" not in bobs
    assert bobs.json()["id"] != alices.json()["id"]
    assert sorted(Order.objects.using("orders").values_list("customer_id", flat=True)) == sorted([alice.id, bob.id])
    assert IdempotencyKey.objects.using("orders").filter(key="order-123").count() == 2
    # And each one's replay finds their own order.
    assert post_json(bob_api, order_body(), key="order-123").json()["id"] == bobs.json()["id"]


def test_a_refused_request_does_not_use_up_its_key(alice_api, catalogue, broker):
    assert_error(post_json(alice_api, with_items({"sku": MUG, "quantity": 0}), key="order-123"), 400)

    accepted = post_json(alice_api, order_body(), key="order-123")

    assert accepted.status_code == 202
    assert "Idempotent-Replayed" not in accepted
    assert rows()["keys"] == 1


def test_without_a_key_the_same_body_places_two_orders(alice_api, catalogue, broker):
    first = post_json(alice_api, order_body())
    second = post_json(alice_api, order_body())

    assert first.json()["id"] != second.json()["id"]
    assert rows() == {"orders": 2, "lines": 2, "history": 2, "keys": 0, "outbox": 4}


# --- inventory ---------------------------------------------------------------------------------


def test_the_stock_list_shows_every_sku(alice_api, catalogue):
    response = alice_api.get("/api/inventory/")

    assert response.status_code == 200
    assert response.json()["results"] == [
        {"sku": "SKU-BOOK", "on_hand": 20, "reserved": 0, "available": 20, "version": 0},
        {"sku": "SKU-LAMP", "on_hand": 10, "reserved": 0, "available": 10, "version": 0},
        {"sku": "SKU-MUG", "on_hand": 50, "reserved": 0, "available": 50, "version": 0},
    ]


def test_the_stock_list_filters_what_is_in_stock(alice_api, catalogue):
    reservation_reserve(saga_id=uuid.uuid4(), order_id=uuid.uuid4(), lines=[{"sku": "SKU-LAMP", "quantity": 10}])

    def skus(query):
        return [item["sku"] for item in alice_api.get(f"/api/inventory/?{query}").json()["results"]]

    assert skus("in_stock=true") == ["SKU-BOOK", "SKU-MUG"]
    assert skus("in_stock=false") == ["SKU-LAMP"]
    assert skus("sku=SKU-M") == ["SKU-MUG"]
    assert_error(alice_api.get("/api/inventory/?in_stock=perhaps"), 400, "invalid_request")


def test_the_stock_detail_shows_reserved_units_and_the_version(alice_api, catalogue):
    reservation_reserve(saga_id=uuid.uuid4(), order_id=uuid.uuid4(), lines=[{"sku": "SKU-LAMP", "quantity": 3}])

    response = alice_api.get("/api/inventory/SKU-LAMP/")

    assert response.status_code == 200
    assert response.json() == {"sku": "SKU-LAMP", "on_hand": 10, "reserved": 3, "available": 7, "version": 1}


def test_an_unknown_sku_is_404(alice_api, catalogue):
    error = assert_error(alice_api.get("/api/inventory/SKU-NOPE/"), 404, "not_found")

    assert "SKU-NOPE" in error["message"]


def test_the_stock_api_needs_a_login(catalogue):
    assert_error(APIClient().get("/api/inventory/"), 401, "not_authenticated")
    assert_error(APIClient().get("/api/inventory/SKU-MUG/"), 401, "not_authenticated")


# --- transaction style per order ---------------------------------------------------------------


@pytest.mark.parametrize("mode", ["orchestrated", "parallel", "tcc", "choreography"])
def test_each_transaction_style_can_be_chosen_per_order(alice_api, catalogue, broker, mode):
    response = post_json(alice_api, {**order_body(), "mode": mode})

    assert response.status_code == 202
    assert Order.objects.using("orders").get(id=response.json()["id"]).mode == mode


def test_the_default_style_is_the_orchestrated_saga(alice_api, catalogue, broker):
    response = post_json(alice_api, order_body())

    assert Order.objects.using("orders").get(id=response.json()["id"]).mode == "orchestrated"


def test_an_unknown_style_is_refused(alice_api, catalogue, broker):
    response = post_json(alice_api, {**order_body(), "mode": "two_phase_commit"})

    assert_error(response, 400, "invalid_request")
    assert "mode" in response.json()["details"]
    assert rows() == NOTHING


@pytest.mark.django_db(transaction=True, databases="__all__")
@pytest.mark.parametrize("mode", ["orchestrated", "parallel", "tcc", "choreography"])
def test_an_order_read_before_its_saga_starts_shows_the_steps_it_will_run(alice_api, catalogue, broker, mode):
    """The start message is still on its way, so there is no saga yet: the order shows every step
    of its flow, pending, the same steps the saga has once it runs (no saga without steps, which
    made a client's lookup by step name fail at random)."""
    receipt = post_json(alice_api, {**order_body(), "mode": mode}).json()

    before = alice_api.get(receipt["url"]).json()["saga"]

    assert before["state"] == "pending"
    names = [s["name"] for s in before["steps"]]
    assert "schedule_shipment" in names
    assert {(s["state"], s["attempts"]) for s in before["steps"]} == {("pending", 0)}
    broker.deliver()
    after = alice_api.get(receipt["url"]).json()["saga"]
    assert after["state"] == "completed"
    assert [s["name"] for s in after["steps"]] == names
    assert [s["kind"] for s in after["steps"]] == [s["kind"] for s in before["steps"]]
