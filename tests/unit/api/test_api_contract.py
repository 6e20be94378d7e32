"""The API does what its OpenAPI schema says, for a client that builds its requests from
`/api/schema/`: each place where the two once disagreed, checked against the schema itself.
`tests/unit/api/test_schema_fuzz.py` looks for the others."""

from __future__ import annotations

import re
import uuid
from decimal import Decimal

import pytest
import yaml
from rest_framework.test import APIClient

from orchestration.models import Saga, SagaEvent
from orders.apis import MAX_LINES
from orders.models import Order, Product
from sagaplatform.kernel.models import FaultRule
from tests.conftest import deliver_until, make_user, order_body

pytestmark = pytest.mark.django_db(databases="__all__")

LISTS = ["/api/orders/", "/api/inventory/", "/api/sagas/", "/api/faults/"]


@pytest.fixture(scope="module")
def schema(django_db_blocker) -> dict:
    with django_db_blocker.unblock():
        response = APIClient().get("/api/schema/")
    assert response.status_code == 200
    return yaml.safe_load(response.content)


@pytest.fixture
def root_api() -> APIClient:
    """A superuser: every list and every endpoint is open to it."""
    user = make_user("root", staff=True)
    user.is_superuser = True
    user.save()
    client = APIClient()
    client.force_authenticate(user)
    return client


def documented_codes(schema: dict, path: str, method: str, status: int) -> set[str]:
    response = schema["paths"][path][method]["responses"][str(status)]
    return {example["value"]["code"] for example in response["content"]["application/json"]["examples"].values()}


def refused(response, field: str) -> bool:
    return (
        response.status_code == 400
        and response.json()["code"] == "invalid_request"
        and field in response.json()["details"]
    )


# --- pagination -----------------------------------------------------------------------------------


@pytest.mark.parametrize("path", LISTS)
@pytest.mark.parametrize("page", ["2", "999999", "2147483647", "9" * 40])
def test_any_page_past_the_last_is_the_documented_404(root_api, schema, path, page):
    response = root_api.get(f"{path}?page={page}")

    assert (response.status_code, response.json()["code"]) == (404, "not_found"), response.content
    assert documented_codes(schema, path, "get", 404) == {"not_found"}


@pytest.mark.parametrize("path", LISTS)
def test_a_page_size_outside_the_documented_range_is_refused_not_clamped(root_api, schema, path):
    parameter = next(p for p in schema["paths"][path]["get"]["parameters"] if p["name"] == "page_size")
    low, high = parameter["schema"]["minimum"], parameter["schema"]["maximum"]

    assert (low, high) == (1, 200)
    assert root_api.get(f"{path}?page_size={high}").status_code == 200
    assert root_api.get(f"{path}?page_size={low}").status_code == 200
    for value in (high + 1, 10**6, low - 1, -5, "abc"):
        assert refused(root_api.get(f"{path}?page_size={value}"), "page_size"), value


@pytest.mark.parametrize(
    ("path", "query"),
    [
        ("/api/orders/", "created_before="),
        ("/api/orders/", "status="),
        ("/api/sagas/", "order_id="),
        ("/api/sagas/", "older_than="),
        ("/api/inventory/", "in_stock="),
    ],
)
def test_a_filter_given_with_no_value_is_refused_not_ignored(root_api, path, query):
    assert refused(root_api.get(f"{path}?{query}"), query.rstrip("="))


def test_an_empty_sku_prefix_is_a_valid_text_filter(root_api, catalogue):
    assert root_api.get("/api/inventory/?sku=").json()["count"] == len(catalogue)


# --- placing an order -----------------------------------------------------------------------------


def test_the_schema_bounds_the_order_lines_as_the_api_does(alice_api, schema, catalogue, broker):
    items = schema["components"]["schemas"]["OrderCreateRequest"]["properties"]["items"]
    skus = [f"SKU-{n:03d}" for n in range(MAX_LINES + 1)]
    Product.objects.using("orders").bulk_create([Product(sku=s, name=s, unit_price=Decimal("1.00")) for s in skus])

    def place(count: int):
        body = order_body(items=[{"sku": s, "quantity": 1} for s in skus[:count]])
        return alice_api.post("/api/orders/", body, format="json")

    assert (items["minItems"], items["maxItems"]) == (1, MAX_LINES)
    assert refused(alice_api.post("/api/orders/", {**order_body(), "items": []}, format="json"), "items")
    assert refused(place(items["maxItems"] + 1), "items")
    assert place(items["maxItems"]).status_code == 202
    assert Order.objects.using("orders").count() == 1


def test_text_is_measured_as_sent_not_trimmed(alice_api, schema, catalogue, broker):
    name = schema["components"]["schemas"]["AddressRequest"]["properties"]["name"]
    body = order_body()

    body["shipping_address"]["name"] = "A" * name["maxLength"] + " "  # one character over
    assert refused(alice_api.post("/api/orders/", body, format="json"), "shipping_address")
    body["shipping_address"]["name"] = " Alice "
    assert alice_api.post("/api/orders/", body, format="json").status_code == 202
    assert Order.objects.using("orders").get().shipping_address["name"] == " Alice "


@pytest.mark.parametrize("value", ["   ", "\u3000", "\x1c", "75\x00001", "\x00"])
def test_blank_text_or_a_nul_character_is_refused_as_the_schema_pattern_says(
    alice_api, schema, catalogue, broker, value
):
    # Python reads the schema's ECMAScript pattern alike: it uses no class whose meaning differs.
    pattern = schema["components"]["schemas"]["AddressRequest"]["properties"]["postal_code"]["pattern"]
    body = order_body()
    body["shipping_address"]["postal_code"] = value

    assert re.search(pattern, value) is None
    assert re.search(pattern, " 75001 ")
    assert refused(alice_api.post("/api/orders/", body, format="json"), "shipping_address")
    assert not Order.objects.using("orders").exists()


@pytest.mark.parametrize(
    ("component", "part", "field", "value"),
    [
        ("PaymentRequest", "payment", "token", "tok_visa\n"),
        ("PaymentRequest", "payment", "token", " tok_visa"),
        ("AddressRequest", "shipping_address", "phone", "+33612345678\n"),
    ],
)
def test_a_pattern_means_the_same_to_the_api_as_to_the_schema(
    alice_api, schema, catalogue, broker, component, part, field, value
):
    pattern = schema["components"]["schemas"][component]["properties"][field]["pattern"]
    body = order_body()
    body[part][field] = value

    # ECMAScript's `$` does not match before a final newline (Python's does, hence `fullmatch`).
    assert re.fullmatch(pattern.removesuffix("$"), value) is None
    assert refused(alice_api.post("/api/orders/", body, format="json"), part)
    assert not Order.objects.using("orders").exists()


def test_a_country_is_one_of_the_schemas_codes_exactly(alice_api, schema, catalogue, broker):
    codes = schema["components"]["schemas"]["CountryEnum"]["enum"]
    body = order_body()
    body["shipping_address"]["country"] = "FR\n"

    assert "FR" in codes
    assert "FR\n" not in codes
    assert refused(alice_api.post("/api/orders/", body, format="json"), "shipping_address")
    assert not Order.objects.using("orders").exists()


@pytest.mark.parametrize("key", ["", "k\x00y"])
def test_an_empty_or_nul_idempotency_key_is_refused_as_the_schema_says(alice_api, schema, catalogue, broker, key):
    header = next(p for p in schema["paths"]["/api/orders/"]["post"]["parameters"] if p["name"] == "Idempotency-Key")

    response = alice_api.post("/api/orders/", order_body(), format="json", HTTP_IDEMPOTENCY_KEY=key)

    assert (header["schema"]["minLength"], header["schema"]["maxLength"]) == (1, 255)
    assert len(key) < 1 or re.search(header["schema"]["pattern"], key) is None
    assert (response.status_code, response.json()["code"]) == (400, "bad_request")
    assert not Order.objects.using("orders").exists()


def test_a_sku_with_a_nul_character_is_not_found_not_a_server_error(alice_api, catalogue):
    response = alice_api.get("/api/inventory/SKU-MUG%00/")

    assert (response.status_code, response.json()["code"]) == (404, "not_found")


# --- the type of each value -----------------------------------------------------------------------


@pytest.mark.django_db(transaction=True, databases="__all__")
@pytest.mark.parametrize("reason", [0, 1.5])
def test_a_reason_that_is_not_a_string_is_refused_by_both_cancels(
    alice_api, operator_api, schema, catalogue, broker, reason
):
    receipt = alice_api.post("/api/orders/", order_body(), format="json").json()
    saga_id = receipt["saga"]["id"]
    deliver_until(broker, "inventory.execute")  # the saga runs, its first command in flight

    by_customer = alice_api.post(f"/api/orders/{receipt['id']}/cancel/", {"reason": reason}, format="json")
    by_operator = operator_api.post(f"/api/sagas/{saga_id}/cancel/", {"reason": reason}, format="json")

    assert refused(by_customer, "reason"), by_customer.content
    assert refused(by_operator, "reason"), by_operator.content
    for component in ("OrderCancelRequest", "SagaCancelRequest"):
        assert schema["components"]["schemas"][component]["properties"]["reason"]["type"] == "string"
    assert Saga.objects.get(id=saga_id).state == "running"
    assert not SagaEvent.objects.filter(saga_id=saga_id, kind="saga_cancel_requested").exists()
    assert Order.objects.using("orders").get(id=receipt["id"]).status == "pending"


def test_a_reason_or_step_that_is_not_a_string_is_refused_by_retry_and_skip(operator_api):
    saga_id = Saga.objects.create(definition="place_order").id

    assert refused(operator_api.post(f"/api/sagas/{saga_id}/retry/", {"reason": 0}, format="json"), "reason")
    skip = operator_api.post(f"/api/sagas/{saga_id}/skip/", {"step": 1, "reason": 2}, format="json")
    assert refused(skip, "step")
    assert refused(skip, "reason")


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("is_enabled", "yes"),
        ("is_enabled", 1),
        ("latency_ms", "5"),
        ("latency_ms", 5.0),
        ("failure_rate", "0.5"),
        ("failure_rate", True),
        ("operation", 5),
        ("crash_point", 0),
    ],
)
def test_a_fault_rule_field_of_another_json_type_is_refused_not_converted(root_api, field, value):
    response = root_api.post("/api/faults/", {"service": "payments", field: value}, format="json")

    assert refused(response, field), response.content
    assert not FaultRule.objects.using("payments").exists()


# --- an unknown saga ------------------------------------------------------------------------------


def test_an_unknown_saga_is_the_same_404_on_every_saga_endpoint(operator_api, schema):
    url = f"/api/sagas/{uuid.uuid4()}/"

    answers = {
        "get": operator_api.get(url),
        "retry": operator_api.post(f"{url}retry/", {"reason": "x"}, format="json"),
        "skip": operator_api.post(f"{url}skip/", {"step": "charge_payment", "reason": "x"}, format="json"),
        "cancel": operator_api.post(f"{url}cancel/", {"reason": "x"}, format="json"),
    }

    assert {name: (r.status_code, r.json()["code"]) for name, r in answers.items()} == dict.fromkeys(
        answers, (404, "not_found")
    )
    documented = {
        "get": documented_codes(schema, "/api/sagas/{saga_id}/", "get", 404),
        **{
            action: documented_codes(schema, f"/api/sagas/{{saga_id}}/{action}/", "post", 404)
            for action in ("retry", "skip", "cancel")
        },
    }
    assert documented == {name: {"not_found"} for name in answers}
