"""Structured logs: JSON lines with the saga's ids, and no secret in any line, whatever logs it."""

from __future__ import annotations

import io
import json
import logging

import pytest
import structlog

from sagaplatform.observability.logging import formatter, message_context, redact
from tests.conftest import order_body

pytestmark = pytest.mark.django_db(transaction=True, databases="__all__")


LOGGERS = (
    "sagaplatform",
    "orchestration",
    "orders",
    "inventory",
    "payments",
    "shipping",
    "notifications",
    "django",
    "django_structlog",
    "celery",
    "axes",
)


@pytest.fixture
def captured(broker):
    """Every line logged at any level, rendered by the production (JSON) formatter as it is
    emitted (the context is read then). After `broker`: loading the tasks runs django.setup()
    again (Celery's Django fixup), which reconfigures logging."""
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    options = formatter(json=True)
    handler.setFormatter(options.pop("()")(**options))
    saved = {}
    for name in LOGGERS:
        logger = logging.getLogger(name)
        saved[name] = logger.level
        logger.addHandler(handler)
        logger.setLevel(logging.DEBUG)
    structlog.contextvars.clear_contextvars()
    yield stream
    for name, level in saved.items():
        logging.getLogger(name).removeHandler(handler)
        logging.getLogger(name).setLevel(level)
    structlog.contextvars.clear_contextvars()


def test_orders_leave_no_token_password_or_card_in_any_log_line(captured, alice_api, catalogue, broker, client):
    client.post("/accounts/login/", {"username": "alice", "password": "alice-pass-wrong-guess"})
    for token in ("tok_visa", "tok_declined", "tok_flaky_9"):
        assert alice_api.post("/api/orders/", order_body(token=token), format="json").status_code == 202
    broker.deliver()
    logging.getLogger("orchestration").warning(
        "a careless line", extra={"context": {"payment_token": "tok_visa", "card": "4242 4242 4242 4242"}}
    )
    text = captured.getvalue()
    lines = [json.loads(line) for line in text.splitlines()]
    assert len(lines) > 20
    for secret in ("tok_visa", "tok_declined", "tok_flaky", "alice-pass", "4242 4242"):
        assert secret not in text, secret
    # The engine's lines name the saga and the order.
    engine = [line for line in lines if line.get("logger") == "orchestration.engine"]
    assert engine
    for line in engine:
        assert line["saga_id"]
        assert line["order_id"]
    failed = [line for line in lines if "failed transiently" in line["event"]]
    assert failed
    assert all(line["step"] == "charge_payment" for line in failed)


def test_redact_replaces_sensitive_fields_and_scrubs_text():
    event = redact(
        None,
        "info",
        {
            "event": "charging tok_secret123 with card 4000 0000 0000 0002, Authorization: Token abcdef0123456789",
            "password": "hunter2",
            "payload": {"payment_token": "tok_x", "items": [{"sku": "SKU-MUG"}]},
            "saga_id": "6c8b5f0e-1111-2222-3333-444455556666",
        },
    )
    assert "tok_secret123" not in event["event"]
    assert "4000 0000 0000 0002" not in event["event"]
    assert "abcdef0123456789" not in event["event"]
    assert event["password"] == "[redacted]"
    assert event["payload"] == {"payment_token": "[redacted]", "items": [{"sku": "SKU-MUG"}]}
    assert event["saga_id"] == "6c8b5f0e-1111-2222-3333-444455556666"  # ids are not card numbers


def test_a_task_binds_the_saga_fields_of_its_message():
    command = {
        "saga_id": "s1",
        "step": "charge_payment",
        "op": "action",
        "attempt": 2,
        "payload": {"order_id": "o1", "payment_token": "tok_visa"},
    }
    assert message_context("payments.execute", command) == {
        "service": "payments",
        "saga_id": "s1",
        "step": "charge_payment",
        "attempt": 2,
        "order_id": "o1",
    }
    start = {"saga_id": "s1", "context": {"order_id": "o1"}}
    assert message_context("orchestration.start_saga", start) == {
        "service": "orchestrator",
        "saga_id": "s1",
        "order_id": "o1",
    }
    assert message_context("kernel.relay_outbox", "payments") == {}
