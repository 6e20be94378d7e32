"""Tracing in-process: off by default (nothing stored, nothing instrumented), a stored context
that is malformed never fails a publication, and the dashboard links a saga's trace."""

from __future__ import annotations

import pytest

from sagaplatform.kernel import outbox
from sagaplatform.kernel.models import OutboxMessage
from sagaplatform.observability import tracing
from tests.conftest import order_body

pytestmark = pytest.mark.django_db(transaction=True, databases="__all__")


def test_tracing_is_off_by_default_and_stores_nothing(alice_api, catalogue, broker):
    assert tracing.wanted_exporter() is None
    assert tracing.ENABLED is False
    response = alice_api.post(
        "/api/orders/", order_body(), format="json", HTTP_TRACEPARENT="00-not-a-trace-id-at-all-01"
    )
    assert response.status_code == 202
    assert set(OutboxMessage.objects.using("orders").values_list("trace_context", flat=True)) == {None}
    broker.deliver()
    assert not OutboxMessage.objects.using("payments").exclude(trace_context=None).exists()


@pytest.mark.parametrize(
    "carrier",
    [{"traceparent": "garbage"}, {"traceparent": "00-" + "0" * 32 + "-" + "0" * 16 + "-01"}, {"x": 1}, "text", None],
)
def test_a_malformed_stored_context_never_fails_a_publication(monkeypatch, carrier, broker):
    monkeypatch.setattr(tracing, "ENABLED", True)  # the API alone: extraction runs for real
    from django.db import transaction

    with transaction.atomic(using="orders"):
        row = OutboxMessage.objects.using("orders").create(
            task="orders.execute", queue="orders", payload={}, trace_context=carrier
        )
    assert outbox.publish(using="orders", messages=[row]) == 1
    assert [m["id"] for m in broker.queue] == [str(row.id)]
    with tracing.restored(carrier):
        assert tracing.current_ids() is None  # nothing valid: a new trace would start here


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        ({}, None),
        ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4318"}, "otlp"),
        ({"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://collector:4318/v1/traces"}, "otlp"),
        ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4318", "OTEL_TRACES_EXPORTER": "none"}, None),
        ({"OTEL_TRACES_EXPORTER": "console"}, "console"),
        ({"OTEL_TRACES_EXPORTER": "null"}, "null"),
        ({"OTEL_TRACES_EXPORTER": "otlp", "OTEL_SDK_DISABLED": "true"}, None),
    ],
)
def test_the_exporter_comes_from_the_standard_environment(monkeypatch, env, expected):
    for name in (
        "OTEL_EXPORTER_OTLP_ENDPOINT",
        "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
        "OTEL_TRACES_EXPORTER",
        "OTEL_SDK_DISABLED",
    ):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    assert tracing.wanted_exporter() == expected


def test_the_dashboard_links_traces_with_the_configured_template(client, settings, django_user_model):
    settings.SAGA_TRACE_URL_TEMPLATE = "http://jaeger.internal:16686/trace/{trace_id}"
    staff = django_user_model.objects.create_user("ops", "ops@example.com", "ops-pass", is_staff=True)
    client.force_login(staff)
    page = client.get("/dashboard/").content.decode()
    assert 'data-trace-url="http://jaeger.internal:16686/trace/{trace_id}"' in page
    assert tracing.trace_url("abc") == "http://jaeger.internal:16686/trace/abc"
    settings.SAGA_TRACE_URL_TEMPLATE = ""
    assert tracing.trace_url("abc") is None
