"""No card token outside the payments service: after orders of every style, with failures and
compensations, the raw tokens are in no database table (but the payments service's own), no
message the broker carried, no log record, and no answer of the API, the order page or the
dashboard's feed."""

from __future__ import annotations

import json
import logging
import uuid

import pytest
from django.conf import settings
from django.db import connections
from django.utils import timezone
from rest_framework.test import APIClient

from orchestration import live
from orchestration.models import Saga, SagaStep
from orders.models import Order
from payments.models import Charge, PaymentMethod
from sagaplatform.kernel import faults
from sagaplatform.kernel.models import FaultRule
from tests.conftest import make_operator, order_body

pytestmark = pytest.mark.django_db(transaction=True, databases="__all__")

# Where the token may be: the payments service's card store, and its charges (while pending).
PAYMENTS_OWN_TABLES = {PaymentMethod._meta.db_table, Charge._meta.db_table}


def _secret() -> str:
    # The simulated gateway accepts any well-formed token as a good card: a unique one cannot
    # match anything else by chance.
    return f"tok_secret_{uuid.uuid4().hex}"


def _rows(alias: str):
    """Every row of every table of one database, as (table, text)."""
    connection = connections[alias]
    with connection.cursor() as cursor:
        for table in connection.introspection.table_names(cursor):
            cursor.execute(f"SELECT * FROM {connection.ops.quote_name(table)}")  # noqa: S608 (introspected names)
            for row in cursor.fetchall():
                yield table, repr(row)


def _found(tokens: list[str], text: str) -> list[str]:
    return [t for t in tokens if t in text]


def _fail_for_good(service: str, operation: str) -> FaultRule:
    rule = FaultRule.objects.using(service).create(service=service, operation=operation, fail_first=1000)
    faults.clear_cache()
    return rule


def test_no_token_outside_the_payments_service(alice, alice_api, catalogue, broker, caplog):
    caplog.set_level(logging.DEBUG)  # every record any logger emits, whatever handlers it has
    cases = [
        # (mode, token, fault (service, operation) or None, how the saga ends)
        ("orchestrated", _secret(), None, "completed"),
        ("orchestrated", "tok_declined", None, "compensated"),
        ("orchestrated", _secret(), ("shipping", "schedule"), "compensated"),  # a refund
        ("parallel", "tok_flaky_2", None, "completed"),  # two transient failures, retried
        ("parallel", _secret(), ("inventory", "reserve"), "compensated"),
        ("tcc", _secret(), None, "completed"),
        ("tcc", _secret(), ("shipping", "book_tentative"), "compensated"),  # a void
        ("choreography", _secret(), None, "completed"),
        ("choreography", "tok_declined", None, "compensated"),
        ("choreography", _secret(), ("shipping", "schedule"), "compensated"),  # a refund
    ]
    placed = []
    for mode, token, fault, ending in cases:
        rule = _fail_for_good(*fault) if fault else None
        response = alice_api.post("/api/orders/", {**order_body(token=token), "mode": mode}, format="json")
        assert response.status_code == 202, response.content
        broker.deliver()
        receipt = response.json()
        saga = Saga.objects.get(id=receipt["saga"]["id"])
        assert saga.state == ending, (mode, token, fault, saga.failure)
        if rule is not None:
            rule.delete(using=fault[0])
            faults.clear_cache()
        placed.append(receipt)
    tokens = sorted({token for _, token, _, _ in cases})

    # The payments service has them: the scan below would see them if they leaked.
    stored = set(PaymentMethod.objects.using("payments").values_list("token", flat=True))
    assert set(tokens) <= stored

    leaks = []
    for alias in settings.DATABASE_ALIASES:
        for table, text in _rows(alias):
            if alias == "payments" and table in PAYMENTS_OWN_TABLES:
                continue
            leaks += [f"{alias}.{table}: {t}" for t in _found(tokens, text)]
    for message in broker.delivered + broker.queue:
        payload = message["payload"]
        leaks += [f"broker {message['task']}: {t}" for t in _found(tokens, json.dumps(payload))]
        if message["task"] == "payments.register_payment_method":
            assert payload["reference"].startswith("pm_")
            assert payload["sealed_token"]
    for record in caplog.records:
        text = f"{record.getMessage()} {record.__dict__!r}"
        leaks += [f"log {record.name}: {t}" for t in _found(tokens, text)]
    assert not leaks, leaks

    # What people see: the customer's API and page, the operator's API and the dashboard feed.
    page = APIClient()
    page.force_login(alice)
    operator = APIClient()
    operator.force_authenticate(make_operator())
    for receipt in placed:
        saga = Saga.objects.get(id=receipt["saga"]["id"])
        assert saga.context["payment_method"].startswith("pm_")
        assert "payment_token" not in saga.context
        shown = [
            alice_api.get(receipt["url"]).content.decode(),
            page.get(f"/orders/{receipt['id']}/").content.decode(),
            operator.get(f"/api/sagas/{saga.id}/").content.decode(),
            json.dumps(live.saga_detail(saga, now=timezone.now()), default=str),
            json.dumps(live.saga_header(saga, SagaStep.objects.filter(saga=saga), now=timezone.now()), default=str),
        ]
        assert not [t for text in shown for t in _found(tokens, text)]
    assert Order.objects.using("orders").count() == len(cases)
