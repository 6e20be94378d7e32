"""The OpenAPI schema and the interactive docs: valid, complete, and served with no CDN."""

from __future__ import annotations

import re

import pytest
import yaml
from django.contrib.staticfiles import finders
from django.core.management import call_command
from rest_framework.test import APIClient

pytestmark = pytest.mark.django_db(databases="__all__")

METHODS = {"get", "post", "put", "patch", "delete"}


@pytest.fixture(scope="module")
def schema(django_db_blocker) -> dict:
    with django_db_blocker.unblock():
        response = APIClient().get("/api/schema/")
    assert response.status_code == 200
    return yaml.safe_load(response.content)


def operations(schema: dict):
    for path, item in schema["paths"].items():
        for method, operation in item.items():
            if method in METHODS:
                yield path, method, operation


def test_the_schema_validates_with_no_warning(tmp_path):
    # What `manage.py spectacular --validate --fail-on-warn` checks: a warning is a gap in the docs.
    call_command("spectacular", "--validate", "--fail-on-warn", "--file", str(tmp_path / "schema.yaml"))

    assert yaml.safe_load((tmp_path / "schema.yaml").read_text())["openapi"].startswith("3.")


def test_every_endpoint_is_in_the_schema(schema):
    assert {(path, method) for path, method, _ in operations(schema)} == {
        ("/api/auth/token/", "post"),
        ("/api/auth/token/", "delete"),
        ("/api/orders/", "get"),
        ("/api/orders/", "post"),
        ("/api/orders/{order_id}/", "get"),
        ("/api/orders/{order_id}/cancel/", "post"),
        ("/api/inventory/", "get"),
        ("/api/inventory/{sku}/", "get"),
        ("/api/sagas/", "get"),
        ("/api/sagas/{saga_id}/", "get"),
        ("/api/sagas/{saga_id}/retry/", "post"),
        ("/api/sagas/{saga_id}/skip/", "post"),
        ("/api/sagas/{saga_id}/cancel/", "post"),
        ("/api/sagas/search/", "get"),
        ("/api/sagas/bulk/", "post"),
        ("/api/sagas/export.csv", "get"),
        ("/api/sagas/{saga_id}/export/", "get"),
        ("/api/sagas/views/", "get"),
        ("/api/sagas/views/", "post"),
        ("/api/sagas/views/{view_id}/", "delete"),
        ("/api/faults/", "get"),
        ("/api/faults/", "post"),
        ("/api/faults/{service}/{rule_id}/", "delete"),
        ("/api/alerts/channels/", "get"),
        ("/api/alerts/channels/", "post"),
        ("/api/alerts/channels/{id}/", "get"),
        ("/api/alerts/channels/{id}/", "patch"),
        ("/api/alerts/channels/{id}/", "delete"),
        ("/api/alerts/notifications/", "get"),
    }


def test_every_operation_is_described_and_tagged(schema):
    for path, method, operation in operations(schema):
        assert operation.get("summary"), (path, method)
        assert operation.get("tags"), (path, method)


def test_every_error_is_documented_with_the_error_shape_and_an_example(schema):
    for path, method, operation in operations(schema):
        errors = {code: r for code, r in operation["responses"].items() if code.startswith("4")}
        if (path, method) != ("/api/auth/token/", "post"):  # the one endpoint open to anonymous callers
            assert "401" in errors, (path, method)
        if method in {"post", "delete"}:
            assert "403" in errors, (path, method)  # CSRF, if not permissions
        if method == "post":
            assert {"400", "413", "415"} <= set(errors), (path, method)
        if "{" in path:
            assert "404" in errors, (path, method)
        for code, response in errors.items():
            content = response["content"]["application/json"]
            assert content["schema"] == {"$ref": "#/components/schemas/Error"}, (path, method, code)
            assert content["examples"], (path, method, code)
            for example in content["examples"].values():
                assert set(example["value"]) == {"code", "message", "details"}


def test_every_field_is_described(schema):
    undocumented = [
        f"{name}.{field}"
        for name, component in schema["components"]["schemas"].items()
        for field, spec in component.get("properties", {}).items()
        # A reference is described by its component; an enum by its values.
        if not spec.get("description") and "$ref" not in spec and "allOf" not in spec
    ]

    assert undocumented == []


def test_the_documented_refusals_of_placing_an_order(schema):
    responses = schema["paths"]["/api/orders/"]["post"]["responses"]

    codes = {
        status: {
            example["value"]["code"]
            for example in responses[status]["content"]["application/json"]["examples"].values()
        }
        for status in ("409", "422", "429")
    }
    assert codes == {"409": {"idempotency_key_in_flight"}, "422": {"idempotency_key_reused"}, "429": {"throttled"}}
    assert "Retry-After" in responses["429"]["headers"]
    assert {"Location", "Idempotent-Replayed"} <= set(responses["202"]["headers"])
    header = next(p for p in schema["paths"]["/api/orders/"]["post"]["parameters"] if p["name"] == "Idempotency-Key")
    assert header["in"] == "header"
    assert "24 hours" in header["description"]


def test_lists_are_paginated_and_filterable(schema):
    for path in ("/api/orders/", "/api/sagas/", "/api/inventory/", "/api/faults/"):
        operation = schema["paths"][path]["get"]
        names = {p["name"] for p in operation.get("parameters", [])}
        assert {"page", "page_size"} <= names, path
        ref = operation["responses"]["200"]["content"]["application/json"]["schema"]["$ref"]
        page = schema["components"]["schemas"][ref.rsplit("/", 1)[1]]
        assert {"count", "next", "previous", "results"} <= set(page["properties"]), path
    saga_filters = {p["name"] for p in schema["paths"]["/api/sagas/"]["get"]["parameters"]}
    assert {"state", "style", "definition", "order_id", "stuck", "older_than", "newer_than"} <= saga_filters
    states = next(p for p in schema["paths"]["/api/sagas/"]["get"]["parameters"] if p["name"] == "state")
    assert {"stuck", "retrying", "parked"} <= set(states["schema"]["items"]["enum"])


def test_the_security_schemes_are_token_session_and_basic(schema):
    schemes = schema["components"]["securitySchemes"]

    assert schemes["tokenAuth"]["name"] == "Authorization"
    assert schemes["cookieAuth"]["in"] == "cookie"
    assert schemes["basicAuth"]["scheme"] == "basic"
    assert "Idempotency" in schema["info"]["description"]


def test_the_schema_and_the_docs_are_public(schema):
    assert APIClient().get("/api/schema/").status_code == 200
    assert APIClient().get("/api/docs/").status_code == 200


def test_the_docs_page_loads_nothing_from_another_site():
    page = APIClient().get("/api/docs/").content.decode()

    assets = re.findall(r'(?:src|href)="([^"]+)"', page)
    assert assets, page
    assert not [a for a in assets if a.startswith(("http:", "https:", "//"))]
    assert not re.search(r"https?://(?!localhost|testserver)", page.replace("http://www.w3.org", ""))
    # The Swagger UI files ship in drf-spectacular-sidecar and are served as static files.
    bundle = next(a for a in assets if a.endswith("swagger-ui-bundle.js"))
    assert finders.find(bundle.removeprefix("/static/"))
