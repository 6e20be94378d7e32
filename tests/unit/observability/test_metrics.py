"""Metrics in-process: `/metrics` is protected, counts come from the engine's timeline (only
what commits), and the scrape-time gauges read the databases."""

from __future__ import annotations

import json

import pytest
from prometheus_client.parser import text_string_to_metric_families

from orchestration import engine
from orchestration.exceptions import OperationNotAllowed
from orchestration.models import Saga
from tests.conftest import order_body

pytestmark = pytest.mark.django_db(transaction=True, databases="__all__")


def scrape(client) -> dict[tuple, float]:
    response = client.get("/metrics")
    assert response.status_code == 200, response.content
    assert response["Content-Type"].startswith("text/plain")
    values: dict[tuple, float] = {}
    for family in text_string_to_metric_families(response.content.decode()):
        for sample in family.samples:
            key = (sample.name, tuple(sorted(sample.labels.items())))
            values[key] = values.get(key, 0) + sample.value
    return values


def total(values, name, **labels) -> float:
    return sum(v for (n, ls), v in values.items() if n == name and all((k, labels[k]) in ls for k in labels))


def delta(before, after, name, **labels) -> float:
    return total(after, name, **labels) - total(before, name, **labels)


@pytest.fixture
def open_metrics(settings):
    settings.DEBUG = True
    settings.SAGA_METRICS_TOKEN = ""


def test_metrics_are_refused_in_production_without_a_token(client, settings):
    settings.DEBUG, settings.SAGA_METRICS_TOKEN = False, ""
    response = client.get("/metrics")
    assert response.status_code == 403
    assert json.loads(response.content)["code"] == "metrics_disabled"


def test_metrics_need_the_bearer_token_when_one_is_set(client, settings):
    settings.DEBUG, settings.SAGA_METRICS_TOKEN = True, "s3cret-token-value"
    assert client.get("/metrics").status_code == 401
    wrong = client.get("/metrics", HTTP_AUTHORIZATION="Bearer nope")
    assert wrong.status_code == 401
    assert json.loads(wrong.content)["code"] == "not_authenticated"
    assert client.get("/metrics", HTTP_AUTHORIZATION="Basic s3cret-token-value").status_code == 401
    assert client.get("/metrics", HTTP_AUTHORIZATION="Bearer s3cret-token-value").status_code == 200


def test_saga_and_step_counts_follow_the_timeline(client, open_metrics, alice_api, catalogue, broker):
    before = scrape(client)
    ok = alice_api.post("/api/orders/", order_body(), format="json").json()
    declined = alice_api.post("/api/orders/", order_body(token="tok_declined"), format="json").json()
    retried = alice_api.post("/api/orders/", order_body(token="tok_flaky_1"), format="json").json()
    broker.deliver()
    after = scrape(client)

    states = dict(
        Saga.objects.filter(id__in=[r["saga"]["id"] for r in (ok, declined, retried)]).values_list("id", "state")
    )
    assert sorted(states.values()) == ["compensated", "completed", "completed"]
    assert delta(before, after, "sagaplatform_sagas_started_total", definition="place_order") == 3
    assert delta(before, after, "sagaplatform_sagas_finished_total", outcome="completed") == 2
    assert delta(before, after, "sagaplatform_sagas_finished_total", outcome="compensated") == 1
    assert delta(before, after, "sagaplatform_saga_duration_seconds_count", outcome="completed") == 2
    charge = {"service": "payments", "step": "charge_payment", "kind": "action"}
    assert delta(before, after, "sagaplatform_step_attempts_total", **charge, outcome="business_failure") == 1
    assert delta(before, after, "sagaplatform_step_attempts_total", **charge, outcome="transient_error") == 1
    assert delta(before, after, "sagaplatform_step_attempts_total", **charge, outcome="succeeded") == 2
    assert delta(before, after, "sagaplatform_step_final_failures_total") == 0
    # Executions of charge_payment: one attempt twice (ok, declined), two attempts once.
    assert delta(before, after, "sagaplatform_step_attempts_per_execution_count", **charge) == 3
    assert delta(before, after, "sagaplatform_step_attempts_per_execution_sum", **charge) == 4
    release = {"service": "inventory", "step": "reserve_stock", "kind": "compensation", "outcome": "succeeded"}
    assert delta(before, after, "sagaplatform_step_attempts_total", **release) == 1
    assert delta(before, after, "sagaplatform_step_handler_duration_seconds_count", service="payments") == 4


def test_a_refused_operation_counts_nothing(client, open_metrics, alice_api, catalogue, broker):
    receipt = alice_api.post("/api/orders/", order_body(), format="json").json()
    broker.deliver()
    before = scrape(client)
    # Shipped: the cancel is refused, and the engine's transaction that recorded nothing rolls back.
    with pytest.raises(OperationNotAllowed):
        engine.saga_cancel(saga_id=receipt["saga"]["id"], context={}, actor="alice")
    with pytest.raises(OperationNotAllowed):
        engine.saga_retry(saga_id=receipt["saga"]["id"], actor="ops")
    after = scrape(client)
    assert delta(before, after, "sagaplatform_cancellations_total") == 0
    assert delta(before, after, "sagaplatform_operator_actions_total") == 0


def test_a_cancellation_is_counted(client, open_metrics, alice_api, catalogue, broker, settings):
    settings.SHIPPING_HANDLING_SECONDS = 3600  # the parcel waits: the order can be cancelled
    receipt = alice_api.post("/api/orders/", order_body(), format="json").json()
    broker.deliver(limit=40)
    before = scrape(client)
    assert alice_api.post(f"/api/orders/{receipt['id']}/cancel/", {}, format="json").status_code in (200, 202)
    broker.deliver(limit=200)
    after = scrape(client)
    assert delta(before, after, "sagaplatform_cancellations_total", definition="place_order") == 1
    assert delta(before, after, "sagaplatform_sagas_finished_total", outcome="cancelled") == 1


def test_scrape_time_gauges_read_the_databases(client, open_metrics, alice_api, catalogue, broker):
    receipt = alice_api.post("/api/orders/", order_body(), format="json").json()
    for message in broker.take("orchestration.start_saga"):
        broker.run(message)  # the saga starts; its first command waits in the queue
    values = scrape(client)
    assert total(values, "sagaplatform_sagas_in_flight", definition="place_order", state="running") == 1
    assert total(values, "sagaplatform_saga_oldest_in_flight_age_seconds", state="running") >= 0
    assert total(values, "sagaplatform_alerts_open", kind="saga_parked") == 0
    assert ("sagaplatform_outbox_unpublished", (("database", "inventory"),)) in values
    assert total(values, "sagaplatform_collector_up", source="sagas") == 1
    assert total(values, "sagaplatform_collector_up", source="outbox") == 1
    saga = Saga.objects.get(id=receipt["saga"]["id"])
    assert saga.state == "running"


def test_a_choreography_saga_is_counted_once_from_its_first_event(client, open_metrics, alice_api, catalogue, broker):
    before = scrape(client)
    body = {**order_body(), "mode": "choreography"}
    assert alice_api.post("/api/orders/", body, format="json").status_code == 202
    broker.deliver()
    after = scrape(client)
    assert delta(before, after, "sagaplatform_sagas_started_total", style="choreography") == 1
    assert delta(before, after, "sagaplatform_sagas_finished_total", style="choreography", outcome="completed") == 1
