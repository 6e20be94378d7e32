"""The outbox (kernel/outbox.py, kernel/rows.py). Its rows as written: on PostgreSQL by a
hand-written INSERT from a cached template, elsewhere by the ORM. Either way a row is what the
ORM would have stored, a message without a due time of its own is due at the database's clock
(and knows it), and a batch is one statement. Its messages as sent: what monitoring shows of
their arguments."""

from __future__ import annotations

from datetime import timedelta

import pytest
from django.db import connections, transaction
from django.test.utils import CaptureQueriesContext

from sagaplatform.kernel import outbox
from sagaplatform.kernel.clock import db_now
from sagaplatform.kernel.models import OutboxMessage

pytestmark = pytest.mark.django_db(transaction=True, databases="__all__")

DB = "orders"
# SQLite's clock in a default is to the millisecond; Python's reading of it to the microsecond.
SQLITE_PRECISION = timedelta(milliseconds=1)


def stored(message: OutboxMessage) -> OutboxMessage:
    return OutboxMessage.objects.using(DB).get(id=message.id)


def test_a_message_without_a_due_time_is_due_at_the_database_clock_and_knows_it(broker):
    with transaction.atomic(using=DB):
        before = db_now(DB)
        with CaptureQueriesContext(connections[DB]) as queries:
            message = outbox.enqueue(using=DB, task="t.one", queue="orders", payload={"a": [1, "x"], "b": None})
    row = stored(message)
    assert len(queries) == 1  # one INSERT, which returns the due time
    assert message.available_at == row.available_at
    assert before - SQLITE_PRECISION <= row.available_at <= db_now(DB)
    assert (row.task, row.queue, row.payload, row.delayed) == ("t.one", "orders", {"a": [1, "x"], "b": None}, False)
    assert row.created_at is not None
    assert row.publish_attempts == 0
    assert row.published_at is not None  # sent once the transaction committed
    assert [(m["id"], m["payload"]) for m in broker.queue] == [(str(message.id), {"a": [1, "x"], "b": None})]


def test_a_batch_is_one_insert_and_each_row_keeps_its_own_due_time(broker):
    with transaction.atomic(using=DB):
        now = db_now(DB)
        messages = [
            outbox.message(task="t.now", queue="orders", payload={"i": 1}),
            outbox.message(task="t.later", queue="orders", payload={"i": 2}, delay=30, now=now),
            outbox.message(task="t.at", queue="orders", payload={"i": 3}, now=now),
        ]
        with CaptureQueriesContext(connections[DB]) as queries:
            outbox.enqueue_many(using=DB, messages=messages)
    assert len([q for q in queries if "INSERT" in q["sql"]]) == 1
    rows = [stored(m) for m in messages]
    assert [r.payload for r in rows] == [{"i": 1}, {"i": 2}, {"i": 3}]
    assert [r.delayed for r in rows] == [False, True, False]
    assert rows[1].available_at == now + timedelta(seconds=30)
    assert rows[2].available_at == now
    assert rows[0].available_at == messages[0].available_at  # the database's, returned
    # The undelayed ones were published when the transaction committed; the delayed one waits.
    assert [r.published_at is not None for r in rows] == [True, False, True]
    assert [m["task"] for m in broker.queue] == ["t.now", "t.at"]


def test_a_delayed_message_without_the_callers_clock_is_due_from_the_database_clock(broker):
    with transaction.atomic(using=DB):
        before = db_now(DB)
        message = outbox.enqueue(using=DB, task="t.retry", queue="orders", payload={}, delay=60)
    row = stored(message)
    assert row.delayed
    assert row.published_at is None
    assert before + timedelta(seconds=60) - SQLITE_PRECISION <= row.available_at <= db_now(DB) + timedelta(seconds=60)


def test_a_message_outside_a_transaction_is_refused_and_nothing_is_written():
    count = OutboxMessage.objects.using(DB).count()
    with pytest.raises(RuntimeError, match=r"inside transaction\.atomic"):
        outbox.enqueue(using=DB, task="t.loose", queue="orders", payload={})
    with pytest.raises(RuntimeError, match=r"inside transaction\.atomic"):
        outbox.enqueue_many(using=DB, messages=[outbox.message(task="t.loose", queue="orders", payload={})])
    assert OutboxMessage.objects.using(DB).count() == count


def test_a_sent_message_shows_monitoring_its_identifying_keys_only(monkeypatch):
    sent = []
    monkeypatch.setattr(outbox.current_app, "send_task", lambda name, **options: sent.append((name, options)))
    payload = {"reference": "pm_1", "order_id": "o-1", "saga_id": "s-1", "sealed_token": "gAAAA-secret"}
    outbox._send(outbox.message(task="payments.register_payment_method", queue="payments", payload=payload))
    ((name, options),) = sent
    assert name == "payments.register_payment_method"
    assert options["args"] == [payload]  # the task gets the whole payload
    assert options["argsrepr"] == "[{'saga_id': 's-1', 'reference': 'pm_1', ...}]"
    assert "secret" not in options["argsrepr"]
    assert options["kwargsrepr"] == "{}"
    assert outbox.argsrepr({"anything": 1}) == "[{...}]"
    assert outbox.argsrepr("not a mapping") == "[...]"
