"""A worker task skips the health check before its first query (a round trip per database per
task) and, when its connection turns out to be dead (a restarted PostgreSQL server), reconnects
and runs once more (`SagaTask.__call__`, sagaplatform/celery.py)."""

from __future__ import annotations

import psycopg
import pytest
from django.db import connections

from sagaplatform.celery import app as celery_app
from tests.conftest import register_tasks

pytestmark = [pytest.mark.postgres, pytest.mark.django_db(transaction=True, databases="__all__")]


def kill(alias: str) -> int:
    """Terminate `alias`'s server session from another connection, as a server restart would."""
    connection = connections[alias]
    connection.ensure_connection()
    pid = connection.connection.info.backend_pid
    params = connection.get_connection_params()
    params.pop("cursor_factory", None)
    params.pop("context", None)
    with psycopg.connect(**params, autocommit=True) as other:
        other.execute("SELECT pg_terminate_backend(%s)", [pid])
    return pid


def test_a_task_on_a_dead_connection_reconnects_and_runs_again(monkeypatch):
    register_tasks()
    checks = []
    connection = connections["inventory"]
    monkeypatch.setattr(connection, "is_usable", lambda original=connection.is_usable: checks.append(1) or original())
    pid = kill("inventory")

    result = celery_app.tasks["kernel.relay_outbox"].apply(args=["inventory"])

    assert result.successful(), result.result
    assert connection.connection.info.backend_pid != pid  # a new session
    assert checks, "the dead connection was found by its failure, then checked"


def test_a_task_on_a_live_connection_makes_no_health_check(monkeypatch):
    register_tasks()
    connection = connections["inventory"]
    connection.ensure_connection()
    checks = []
    monkeypatch.setattr(connection, "is_usable", lambda original=connection.is_usable: checks.append(1) or original())

    for _ in range(3):
        assert celery_app.tasks["kernel.relay_outbox"].apply(args=["inventory"]).successful()

    assert checks == []


def test_a_task_failing_for_another_reason_is_not_run_again(monkeypatch):
    """Only a dead connection earns the second run: an operational error on a live one (a lock
    timeout, a cancelled statement) fails the task as before."""
    from django.db import OperationalError

    from sagaplatform.kernel import outbox

    register_tasks()
    runs = []

    def failing(*, using, limit=500):
        runs.append(using)
        with connections[using].cursor() as cursor:
            cursor.execute("SET LOCAL statement_timeout = 1; SELECT pg_sleep(0.1)")
        raise AssertionError("not reached")

    monkeypatch.setattr(outbox, "relay_due", failing)
    result = celery_app.tasks["kernel.relay_outbox"].apply(args=["inventory"])

    assert result.failed()
    assert isinstance(result.result, OperationalError)
    assert runs == ["inventory"]


def test_a_task_whose_failed_query_was_in_a_transaction_runs_again():
    """The registration of a card reads and writes in `transaction.atomic`: its failed rollback
    closes the dead connection, and the task must still run again (a lost registration fails
    the order's charge as `payment_method_unknown`, as a chaos test found)."""
    from payments.models import PaymentMethod
    from sagaplatform.kernel import sealing

    register_tasks()
    pid = kill("payments")

    message = {"reference": "pm_restart", "order_id": None, "sealed_token": sealing.seal("tok_visa")}
    result = celery_app.tasks["payments.register_payment_method"].apply(args=[message])

    assert result.successful(), result.result
    assert PaymentMethod.objects.using("payments").get(reference="pm_restart").token == "tok_visa"
    assert connections["payments"].connection.info.backend_pid != pid


def test_a_task_meeting_several_dead_connections_reconnects_them_all():
    """A server restart kills every database's session at once: a task that reads several
    databases meets them one after the other, and runs again once every dead one is replaced."""
    register_tasks()
    from django.conf import settings

    killed = {alias: kill(alias) for alias in settings.DATABASE_ALIASES}

    result = celery_app.tasks["orchestration.alert_dead_letters"].apply()

    assert result.successful(), result.result
    for alias, pid in killed.items():
        assert connections[alias].connection.info.backend_pid != pid, alias


def test_a_task_whose_prepared_statement_a_migration_made_stale_reconnects_and_runs_again(monkeypatch):
    """Workers prepare the statements they run often (DATABASE_PREPARED_STATEMENTS; the tests
    run with them too). A migration that changes the type of a column such a statement returns
    makes PostgreSQL refuse it on that session for good ("cached plan must not change result
    type"), even outside a transaction: the task reconnects, which prepares it afresh, and runs
    once more."""
    from sagaplatform.kernel import outbox
    from sagaplatform.kernel.models import OutboxMessage

    register_tasks()
    runs = []
    monkeypatch.setattr(outbox, "relay_due", lambda original=outbox.relay_due, **kw: runs.append(1) or original(**kw))
    connection = connections["inventory"]
    relay = celery_app.tasks["kernel.relay_outbox"]
    for _ in range(6):  # psycopg prepares a statement at its sixth run on a session
        assert relay.apply(args=["inventory"]).successful()
    with connection.cursor() as cursor:
        cursor.execute("SELECT count(*) FROM pg_prepared_statements")
        assert cursor.fetchone()[0] > 0, "the relay's query was not prepared"
    pid = connection.connection.info.backend_pid
    table = connection.ops.quote_name(OutboxMessage._meta.db_table)
    params = connection.get_connection_params()
    params.pop("cursor_factory", None)
    params.pop("context", None)
    params.pop("prepare_threshold", None)
    with psycopg.connect(**params, autocommit=True) as other:
        other.execute(f"ALTER TABLE {table} ALTER COLUMN publish_attempts TYPE bigint")
        try:
            runs.clear()
            result = relay.apply(args=["inventory"])
        finally:
            other.execute(f"ALTER TABLE {table} ALTER COLUMN publish_attempts TYPE integer")
            connection.close()  # its statements were prepared against the bigint column

    assert result.successful(), result.result
    assert runs == [1, 1]  # refused once, then run again on a new session
    assert connection.connection is None or connection.connection.info.backend_pid != pid


def test_a_statement_stale_again_after_the_reconnection_fails_the_task(monkeypatch):
    """One more run, not a loop: a task whose statement is refused again on its new session fails
    as any other database error would."""
    from django.db import NotSupportedError

    from sagaplatform.kernel import outbox

    register_tasks()
    runs = []

    def stale(*, using, limit=500):
        runs.append(using)
        try:
            raise psycopg.errors.FeatureNotSupported("cached plan must not change result type")
        except psycopg.Error as exc:
            raise NotSupportedError(str(exc)) from exc

    monkeypatch.setattr(outbox, "relay_due", stale)
    result = celery_app.tasks["kernel.relay_outbox"].apply(args=["inventory"])

    assert result.failed()
    assert isinstance(result.result, NotSupportedError)
    assert runs == ["inventory", "inventory"]
