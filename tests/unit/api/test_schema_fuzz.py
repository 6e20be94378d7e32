"""Schemathesis against the live OpenAPI schema, with generated valid and invalid input: every
operation a customer may use as a customer (who owns the order the examples name), every other
one as a staff superuser. Each answer must not be a server error, must have a documented status
and content type, and must match the documented body and headers; input the schema forbids must
be refused, and input it allows accepted. A customer is refused every staff operation (one
request each: whatever the input, the answer is the same 403); what staff get from the customer's
operations is in test_permissions.py.

It runs in-process through the WSGI app, on the test databases; messages the API publishes stay
in the in-test broker, so nothing is executed, and fault rules it creates never fire.
"""

from __future__ import annotations

from contextlib import contextmanager
from decimal import Decimal

import pytest
import schemathesis
from django.core.signals import request_finished, request_started
from django.core.wsgi import get_wsgi_application
from django.db import close_old_connections
from hypothesis import HealthCheck, settings
from rest_framework.authtoken.models import Token
from schemathesis.core.result import Err

from orchestration import engine
from orders.apis import ORDER_ID, SAGA_ID
from orders.models import Order, OrderLine, Product
from tests.conftest import ADDRESS, make_user

pytestmark = [pytest.mark.django_db(databases="__all__")]

# Per operation, in the fuzzing phase; the coverage phase before it makes most of the cases (every
# boundary and wrong type of every field and parameter: 2,000 for the staff operations).
MAX_EXAMPLES = 12

# Every check schemathesis 4 offers for a single request: beyond "no 5xx", the status, content
# type, headers and body must be documented; data the schema forbids must be refused (4xx), and
# data it allows accepted (`positive_data_acceptance` below), and authentication must be
# enforced (`ignored_auth` below: both wrap schemathesis's own). The checks left out
# (`use_after_free`, `ensure_resource_availability`, `object_level_authorization`) follow links
# between requests, in schemathesis' stateful runs.
CHECKS = [
    schemathesis.checks.not_a_server_error,
    schemathesis.checks.status_code_conformance,
    schemathesis.checks.content_type_conformance,
    schemathesis.checks.response_headers_conformance,
    schemathesis.checks.response_schema_conformance,
    schemathesis.checks.negative_data_rejection,
    schemathesis.checks.missing_required_header,
    schemathesis.checks.unsupported_method,
    schemathesis.checks.allow_header_conformance,
]

# Refusals of well-formed requests that depend on what the server holds, which no schema can
# promise: whether a user with that password exists, whether the key was used with another body,
# whether an alert channel's target is a real address or http(s) URL for its kind.
STATE_REFUSALS = {"invalid_credentials", "idempotency_key_reused", "invalid_channel"}
# Enough products for the longest order the schema allows, each line a different SKU.
FUZZ_SKUS = [f"SKU-FUZZ-{n:02}" for n in range(50)]


def positive_data_acceptance(ctx, response, case):
    """schemathesis's check, less the refusals in `STATE_REFUSALS` (documented per endpoint)."""
    if response.status_code in (400, 422) and _code(response) in STATE_REFUSALS:
        return None
    return schemathesis.checks.positive_data_acceptance(ctx, response, case)


# Operations whose authentication `ignored_auth` has confirmed, in this process.
AUTH_ENFORCED: set[str] = set()


def ignored_auth(ctx, response, case):
    """schemathesis's check, which sends an accepted request again without and with a wrong
    credential, once per operation as its own runner does (enforcement is a property of the
    operation, not of the input); called from pytest it probed every accepted case, a fifth of
    this file's time."""
    if ctx.auth_enforced_operations is None:
        ctx.auth_enforced_operations = AUTH_ENFORCED
    return schemathesis.checks.ignored_auth(ctx, response, case)


def _code(response) -> str | None:
    try:
        return response.json().get("code")
    except ValueError:
        return None


def with_catalogue_skus(case) -> None:
    """Whether a SKU is in the catalogue is data, not schema: a valid order names products that
    exist, each once, so that valid orders reach the `202` path."""
    body = case.body
    if case.meta.generation.mode.is_positive and case.operation.label == "POST /api/orders/":
        for item, sku in zip(body["items"], FUZZ_SKUS, strict=False):
            item["sku"] = sku


@contextmanager
def in_test_transaction():
    """Call the WSGI app in the test's own thread and transaction. Django closes "obsolete"
    connections when a request starts and ends, and inside the test's transaction every
    connection looks obsolete: Django's test client unhooks that too."""
    request_started.disconnect(close_old_connections)
    request_finished.disconnect(close_old_connections)
    try:
        yield
    finally:
        request_started.connect(close_old_connections)
        request_finished.connect(close_old_connections)


# Loaded when the module is collected (schemathesis' lazy `from_fixture` does not work with this
# pytest); the schema view needs no database.
with in_test_transaction():
    schema = schemathesis.openapi.from_wsgi("/api/schema/?format=json", get_wsgi_application())

# What a customer may call: signing in and out, the catalogue's stock, their orders.
CUSTOMER_PATHS = r"^/api/(auth|inventory|orders)/"
customer_schema = schema.include(path_regex=CUSTOMER_PATHS)
staff_schema = schema.exclude(path_regex=CUSTOMER_PATHS)


def operations(of) -> list:
    """The operations of a schema; one the schema does not describe properly fails here."""
    found = []
    for result in of.get_all_operations():
        if isinstance(result, Err):
            raise result.err()
        found.append(result.ok())
    return found


STAFF_ONLY = operations(staff_schema)


@pytest.fixture(autouse=True)
def _world(catalogue, broker, settings):
    settings.PASSWORD_HASHERS = ["django.contrib.auth.hashers.MD5PasswordHasher"]
    # Throttled requests are checked in test_api_limits.py; here they would hide the rest.
    settings.REST_FRAMEWORK = {
        **settings.REST_FRAMEWORK,
        "DEFAULT_THROTTLE_RATES": {"orders_create": "100000/minute", "auth_token": "100000/minute"},
    }
    # So is the lockout after repeated wrong passwords (test_security.py): here `ignored_auth`
    # sends many, and a locked-out address would answer 429 where the check wants 401/403.
    settings.AXES_FAILURE_LIMIT = 1_000_000
    with in_test_transaction():
        yield


@pytest.fixture
def tokens() -> dict[str, str]:
    """A customer who owns the order, and a saga, that the documented path examples name."""
    customer = make_user("fuzzy")
    staff = make_user("root", staff=True)
    staff.is_superuser = True
    staff.save()
    order = Order.objects.using("orders").create(
        id=ORDER_ID, saga_id=SAGA_ID, customer_id=customer.id, total=Decimal("25.00"), shipping_address=ADDRESS
    )
    OrderLine.objects.using("orders").create(order=order, sku="SKU-MUG", quantity=2, unit_price=Decimal("12.50"))
    Product.objects.using("orders").bulk_create(
        [Product(sku=sku, name=sku, unit_price=Decimal("1.00")) for sku in FUZZ_SKUS]
    )
    engine.saga_start(saga_id=SAGA_ID, definition="place_order", context={"order_id": ORDER_ID, "mode": "orchestrated"})
    return {name: Token.objects.create(user=user).key for name, user in (("customer", customer), ("staff", staff))}


fuzz = settings(
    max_examples=MAX_EXAMPLES,
    deadline=None,
    suppress_health_check=list(HealthCheck),
    derandomize=True,  # the same cases on every run: a CI failure reproduces locally
)


@customer_schema.parametrize()
@fuzz
def test_as_a_customer(case, tokens):
    with_catalogue_skus(case)
    case.call_and_validate(
        headers={"Authorization": f"Token {tokens['customer']}"},
        checks=[*CHECKS, ignored_auth, positive_data_acceptance],
    )


@staff_schema.parametrize()
@fuzz
def test_as_staff(case, tokens):
    with_catalogue_skus(case)
    case.call_and_validate(
        headers={"Authorization": f"Token {tokens['staff']}"}, checks=[*CHECKS, ignored_auth, positive_data_acceptance]
    )


@pytest.mark.parametrize("operation", STAFF_ONLY, ids=lambda operation: operation.label)
def test_a_customer_is_refused_every_other_operation(operation, tokens, client):
    path = operation.path
    for parameter in operation.path_parameters:
        kind = parameter.definition["schema"]
        value = SAGA_ID if kind.get("format") == "uuid" else 1 if kind.get("type") == "integer" else "payments"
        path = path.replace("{" + parameter.name + "}", str(value))
    response = client.generic(
        operation.method.upper(),
        path,
        "{}",
        content_type="application/json",
        HTTP_AUTHORIZATION=f"Token {tokens['customer']}",
    )
    assert response.status_code == 403, (operation.label, response.content)
    assert response.json()["code"] == "permission_denied"


def test_the_customers_operations_are_fuzzed_as_a_customer():
    # The split is by path; this is what it selects (a refusal above flags one it missed).
    assert {operation.label for operation in operations(customer_schema)} == {
        "POST /api/auth/token/",
        "DELETE /api/auth/token/",
        "GET /api/inventory/",
        "GET /api/inventory/{sku}/",
        "GET /api/orders/",
        "POST /api/orders/",
        "GET /api/orders/{order_id}/",
        "POST /api/orders/{order_id}/cancel/",
    }


def test_the_catalogue_is_there():
    # The fuzzed orders name real SKUs only by chance; the catalogue makes the happy path reachable.
    assert Product.objects.using("orders").count() == 3
