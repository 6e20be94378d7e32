"""The operations figures on `/metrics`: each circuit breaker's state, window and transitions, the
steps that waited for one (orchestrated and choreographed), the optimistic-lock conflicts, retries
and give-ups of the inventory service, and the alert deliveries by channel and outcome; scraped
and checked against what happened."""

from __future__ import annotations

import re
import socket
import uuid

import pytest
from django.core import mail
from django.db.models import F
from django.db.models.query import QuerySet

from inventory import contention, services
from inventory.exceptions import StockContention
from inventory.models import StockItem
from inventory.services import reservation_reserve, stock_set
from orchestration import alerting
from orchestration.models import AlertChannel, AlertDelivery, SagaEvent
from sagaplatform.kernel import breakers
from tests.conftest import order_body
from tests.unit.observability.test_metrics import delta, scrape, total

pytestmark = pytest.mark.django_db(transaction=True, databases="__all__")

SECRET = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"


@pytest.fixture(autouse=True)
def open_metrics(settings):
    settings.DEBUG = True
    settings.SAGA_METRICS_TOKEN = ""


@pytest.fixture
def breaker_on(settings):
    settings.BREAKER_ENABLED = True
    settings.BREAKER_MIN_CALLS = 4
    settings.BREAKER_FAILURE_RATE = 0.5
    settings.BREAKER_RESUME_SPREAD = 0.5
    breakers.reset()
    yield
    breakers.reset()


def breaker_state(values, name: str) -> str:
    (state,) = [
        s
        for s in ("closed", "open", "half_open")
        if total(values, "sagaplatform_breaker_state", breaker=name, state=s) == 1
    ]
    return state


def test_each_breakers_state_window_and_transitions_are_exported(client, breaker_on):
    before = scrape(client)
    for name in ("orders", "inventory", "payments", "shipping", "notifications", "payment_gateway"):
        assert breaker_state(before, name) == "closed"  # every breaker, before any call
    for ok in (True, False, False, False):
        breakers.record("payments", ok)  # 3 failures of 4 calls: open
    opened = scrape(client)
    assert breaker_state(opened, "payments") == "open"
    assert breaker_state(opened, "shipping") == "closed"
    assert total(opened, "sagaplatform_breaker_window_calls", breaker="payments") == 4
    assert total(opened, "sagaplatform_breaker_window_failures", breaker="payments") == 3
    assert delta(before, opened, "sagaplatform_breaker_transitions_total", breaker="payments", state="open") == 1

    breakers.force("payments", "closed", by="user:ops")
    breakers.force("shipping", "open", by="user:ops", seconds=60)
    after = scrape(client)
    assert breaker_state(after, "payments") == "closed"
    assert breaker_state(after, "shipping") == "open"
    assert total(after, "sagaplatform_breaker_window_calls", breaker="payments") == 0  # closed afresh
    assert delta(opened, after, "sagaplatform_breaker_transitions_total", breaker="payments", state="closed") == 1
    assert delta(opened, after, "sagaplatform_breaker_transitions_total", breaker="shipping", state="open") == 1
    assert total(after, "sagaplatform_collector_up", source="breakers") == 1


def test_no_breaker_figures_while_the_breakers_are_off(client, settings):
    settings.BREAKER_ENABLED = False
    values = scrape(client)
    assert total(values, "sagaplatform_breaker_state") == 0
    assert total(values, "sagaplatform_collector_up", source="breakers") == 1


def test_steps_that_wait_for_a_breaker_are_counted_as_in_their_timeline(
    client, breaker_on, alice_api, catalogue, broker
):
    breakers.force("payments", "open", by="test", seconds=3600)
    before = scrape(client)
    orchestrated = alice_api.post("/api/orders/", order_body(), format="json").json()["saga"]["id"]
    choreographed = alice_api.post("/api/orders/", {**order_body(), "mode": "choreography"}, format="json").json()[
        "saga"
    ]["id"]
    broker.deliver(limit=40)
    after = scrape(client)

    for saga_id in (orchestrated, choreographed):
        waits = SagaEvent.objects.filter(saga_id=saga_id, kind="step_deferred")
        assert waits.exists()
        assert {(e.step, e.data["breaker"]) for e in waits} == {("charge_payment", "payments")}
    counted = SagaEvent.objects.filter(saga_id__in=[orchestrated, choreographed], kind="step_deferred").count()
    labels = {"service": "payments", "step": "charge_payment", "breaker": "payments"}
    assert delta(before, after, "sagaplatform_step_deferrals_total", **labels) == counted
    assert delta(before, after, "sagaplatform_step_deferrals_total") == counted


def test_optimistic_lock_conflicts_retries_and_give_ups_per_service(client, monkeypatch, settings):
    """A rival writer bumps the row between our read and our conditional update (as in
    tests/unit/ops/test_contention.py)."""
    rival = {"times": 0}
    real_first = QuerySet.first

    def first_then_rival_writes(self):
        row = real_first(self)
        if self.model is StockItem and self._fields and row is not None and rival["times"] > 0:
            rival["times"] -= 1
            StockItem.objects.using("inventory").filter(id=row["id"]).update(version=F("version") + 1)
        return row

    monkeypatch.setattr(QuerySet, "first", first_then_rival_writes)
    monkeypatch.setattr(services, "_backoff", lambda attempt: None)
    contention.reset()
    stock_set(sku="SKU-MUG", on_hand=10)
    settings.INVENTORY_MAX_LOCK_ATTEMPTS = 3
    before = scrape(client)

    rival["times"] = 2  # two conflicts, both retried, then reserved
    reservation_reserve(saga_id=uuid.uuid4(), order_id=uuid.uuid4(), lines=[{"sku": "SKU-MUG", "quantity": 1}])
    rival["times"] = 3  # three conflicts: two retried, then out of attempts
    with pytest.raises(StockContention):
        reservation_reserve(saga_id=uuid.uuid4(), order_id=uuid.uuid4(), lines=[{"sku": "SKU-MUG", "quantity": 1}])
    after = scrape(client)

    assert delta(before, after, "sagaplatform_optimistic_lock_conflicts_total", service="inventory") == 5
    assert delta(before, after, "sagaplatform_optimistic_lock_retries_total", service="inventory") == 4
    assert delta(before, after, "sagaplatform_optimistic_lock_exhausted_total", service="inventory") == 1
    # The same figures as the contention panel's.
    minutes = contention.summary()["minutes"]
    assert (sum(m["conflicts"] for m in minutes), sum(m["retries"] for m in minutes)) == (5, 4)
    contention.reset()


def test_alert_deliveries_by_channel_and_outcome(client, breaker_on, broker, settings):
    settings.ALERT_DELIVERY_MAX_ATTEMPTS = 2
    AlertChannel.objects.create(name="oncall", kind="email", target="oncall@example.com")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        closed = f"http://127.0.0.1:{s.getsockname()[1]}/"  # nothing listens: refused at once
    AlertChannel.objects.create(name="nobody", kind="webhook", target=closed, secret=SECRET)
    breakers.force("payments", "open", by="test", seconds=3600)
    before = scrape(client)

    alerting.evaluate(rules=["breaker_open"])
    broker.deliver()
    after = scrape(client)

    assert [m.subject for m in mail.outbox] == ["[CRITICAL] The payments circuit breaker is open"]
    assert dict(AlertDelivery.objects.values_list("channel__name", "state")) == {
        "oncall": "delivered",
        "nobody": "failed",
    }
    attempts, ended = "sagaplatform_alert_delivery_attempts_total", "sagaplatform_alert_deliveries_total"
    assert delta(before, after, attempts, channel="oncall", outcome="ok") == 1
    assert delta(before, after, attempts, channel="oncall", outcome="error") == 0
    assert delta(before, after, ended, channel="oncall", outcome="delivered") == 1
    assert delta(before, after, attempts, channel="nobody", outcome="error") == 2
    assert delta(before, after, ended, channel="nobody", outcome="failed") == 1
    assert delta(before, after, ended, channel="nobody", outcome="delivered") == 0


def test_every_metric_the_dashboard_and_the_alert_rules_use_is_exported():
    """A name typed wrong in deploy/ (or a metric renamed in the code) would show an empty panel
    or an alert that can never fire."""
    from tests.processes import ROOT

    code = "".join(path.read_text() for path in (ROOT / "sagaplatform" / "observability").glob("*.py"))
    defined = set(re.findall(r'f"\{PREFIX\}_(\w+)"', code))
    used = set()
    for path in ("deploy/grafana/sagaplatform.json", "deploy/prometheus/alerts.yml"):
        used |= set(re.findall(r"sagaplatform_(\w+)", (ROOT / path).read_text()))
    suffixes = re.compile(r"_(total|bucket|count|sum)$")
    missing = {name for name in used if name not in defined and suffixes.sub("", name) not in defined}
    assert not missing, missing
    assert {"breaker_state", "breaker_transitions", "step_deferrals", "optimistic_lock_retries"} <= defined
