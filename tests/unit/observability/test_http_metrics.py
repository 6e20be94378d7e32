"""HTTP request metrics (sagaplatform/observability/http.py): requests by method, route template
and status, latency, requests in progress and unhandled exceptions, as `/metrics` serves them."""

from __future__ import annotations

import asyncio
import uuid

import pytest
from django.http import HttpResponse
from django.test import AsyncClient, Client
from django.urls import include, path

from sagaplatform.observability import http, metrics
from sagaplatform.overload import ConcurrencyLimit
from tests.conftest import order_body
from tests.unit.observability.test_metrics import delta, scrape, total

REQUESTS = "sagaplatform_http_requests_total"
LATENCY_COUNT = "sagaplatform_http_request_duration_seconds_count"


@pytest.fixture
def open_metrics(settings):
    settings.DEBUG = True
    settings.SAGA_METRICS_TOKEN = ""


def _boom(request, n):
    raise RuntimeError(f"boom {n}")


def _ok(request, n):
    return HttpResponse(f"ok {n}")


# A URLconf with the site's routes plus two of the test's own (settings.ROOT_URLCONF = __name__).
urlpatterns = [
    path("test-boom/<int:n>/", _boom),
    path("test-ok/<int:n>/", _ok),
    path("", include("sagaplatform.urls")),
]


@pytest.mark.django_db(transaction=True, databases="__all__")
def test_requests_are_counted_by_route_template_method_and_status(client, open_metrics, alice_api, catalogue, broker):
    receipt = alice_api.post("/api/orders/", order_body(), format="json")
    assert receipt.status_code == 202
    order_id = receipt.json()["id"]
    missing = uuid.uuid4()
    before = scrape(client)

    assert client.get("/healthz").status_code == 200
    assert alice_api.get(f"/api/orders/{order_id}/").status_code == 200
    assert alice_api.get(f"/api/orders/{missing}/").status_code == 404
    assert alice_api.get("/api/orders/?page_size=0").status_code == 400
    assert alice_api.post("/api/orders/", {"items": "nope"}, format="json").status_code == 400
    assert client.get(f"/no/such/page/{missing}/").status_code == 404
    after = scrape(client)

    detail = "/api/orders/<uuid:order_id>/"
    assert delta(before, after, REQUESTS, method="GET", route="/healthz", status="200") == 1
    assert delta(before, after, REQUESTS, method="GET", route=detail, status="200") == 1
    assert delta(before, after, REQUESTS, method="GET", route=detail, status="404") == 1
    assert delta(before, after, REQUESTS, method="GET", route="/api/orders/", status="400") == 1
    assert delta(before, after, REQUESTS, method="POST", route="/api/orders/", status="400") == 1
    assert delta(before, after, REQUESTS, method="GET", route="(unmatched)", status="404") == 1
    # The scrape before this one is counted too (a scrape sees the requests before it).
    assert delta(before, after, REQUESTS, method="GET", route="/metrics", status="200") == 1
    assert delta(before, after, LATENCY_COUNT, method="GET", route=detail) == 2
    assert delta(before, after, LATENCY_COUNT, method="POST", route="/api/orders/") == 1
    assert total(after, "sagaplatform_http_requests_in_progress") == 1  # the scrape itself

    # Never a path with its ids: every route label is a pattern (or one of the fixed names).
    routes = {dict(labels).get("route") for (name, labels) in after if name == REQUESTS}
    assert detail in routes
    assert not [r for r in routes if order_id in r or str(missing) in r]
    assert {r for r in routes if not r.startswith("/")} <= {"(unmatched)", "(static)", "(shed)"}


@pytest.mark.django_db(transaction=True, databases="__all__")
def test_an_unhandled_exception_is_counted_by_route_and_answered_500(open_metrics, settings):
    settings.ROOT_URLCONF = __name__
    client = Client(raise_request_exception=False)
    before = scrape(client)
    assert client.get("/test-boom/7/").status_code == 500
    assert client.get("/test-ok/7/").status_code == 200
    after = scrape(client)
    assert delta(before, after, "sagaplatform_http_exceptions_total", method="GET", route="/test-boom/<int:n>/") == 1
    assert delta(before, after, "sagaplatform_http_exceptions_total") == 1
    assert delta(before, after, REQUESTS, route="/test-boom/<int:n>/", status="500") == 1
    assert delta(before, after, REQUESTS, route="/test-ok/<int:n>/", status="200") == 1


def _count(method: str, route: str, status: str) -> float:
    return http.REQUESTS.labels(method, route, status)._value.get()


def test_the_async_stack_is_counted_too():
    """Under daphne the middleware chain runs async: the middleware counts there as well."""
    before_ok = _count("GET", "/favicon.ico", "301")
    before_missing = _count("GET", "(unmatched)", "404")

    async def requests():
        client = AsyncClient()
        return (await client.get("/favicon.ico")).status_code, (await client.get("/nowhere/42/")).status_code

    assert asyncio.run(requests()) == (301, 404)
    assert _count("GET", "/favicon.ico", "301") == before_ok + 1
    assert _count("GET", "(unmatched)", "404") == before_missing + 1


def test_an_unknown_method_is_labelled_other():
    before = _count("other", "/favicon.ico", "301")
    assert Client().generic("BREW", "/favicon.ico").status_code == 301
    assert _count("other", "/favicon.ico", "301") == before + 1


def test_nothing_is_counted_with_metrics_off(monkeypatch):
    monkeypatch.setattr(metrics, "ENABLED", False)
    before = _count("GET", "/favicon.ico", "301")
    assert Client().get("/favicon.ico").status_code == 301
    assert _count("GET", "/favicon.ico", "301") == before


def test_a_request_shed_by_the_concurrency_limit_is_counted():
    release = asyncio.Event()

    async def app(scope, receive, send):
        await release.wait()
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b""})

    limited = ConcurrencyLimit(app, limit=1, retry_after=1)
    before = _count("POST", "(shed)", "503")

    async def scenario():
        statuses = []

        async def send(message):
            if message["type"] == "http.response.start":
                statuses.append(message["status"])

        held = asyncio.create_task(limited({"type": "http", "method": "POST"}, None, send))
        await asyncio.sleep(0)
        await limited({"type": "http", "method": "POST"}, None, send)
        release.set()
        await held
        return statuses

    assert asyncio.run(scenario()) == [503, 200]
    assert _count("POST", "(shed)", "503") == before + 1


@pytest.mark.django_db(transaction=True, databases="__all__")
def test_the_dashboard_http_row_uses_metrics_that_exist(open_metrics, settings):
    import json
    import re

    settings.ROOT_URLCONF = __name__
    client = Client(raise_request_exception=False)
    client.get("/test-boom/1/")  # so that the exceptions counter has a sample
    names = {name for name, _ in scrape(client)}
    dashboard = json.loads((settings.BASE_DIR / "deploy" / "grafana" / "sagaplatform.json").read_text())
    used = {
        name
        for panel in dashboard["panels"]
        for target in panel.get("targets", ())
        for name in re.findall(r"sagaplatform_http_\w+", target["expr"])
    }
    assert len(used) == 4
    assert used <= names, used - names
