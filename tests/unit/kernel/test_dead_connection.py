"""A worker task skips the health check before its first query (a round trip per database per
task) and, when its connection turns out to be dead (a restarted PostgreSQL server), reconnects
and runs once more (`SagaTask.__call__`, sagaplatform/celery.py)."""

from __future__ import annotations

import pytest
from django.db import connections

from sagaplatform.celery import app as celery_app

pytestmark = [pytest.mark.postgres, pytest.mark.django_db(transaction=True, databases="__all__")]


def kill(alias: str) -> int:
    """Terminate `alias`'s server session from another connection, as a server restart would."""
    connection = connections[alias]
    connection.ensure_connection()
    pid = connection.connection.info.backend_pid
    with connections["default"].cursor() as cursor:
        cursor.execute("SELECT pg_terminate_backend(%s)", [pid])
    return pid


def test_a_task_on_a_dead_connection_reconnects_and_runs_again(monkeypatch):
    celery_app.loader.import_default_modules()
    checks = []
    connection = connections["inventory"]
    monkeypatch.setattr(connection, "is_usable", lambda original=connection.is_usable: checks.append(1) or original())
    pid = kill("inventory")

    result = celery_app.tasks["kernel.relay_outbox"].apply(args=["inventory"])

    assert result.successful(), result.result
    assert connection.connection.info.backend_pid != pid  # a new session
    assert checks, "the dead connection was found by its failure, then checked"


def test_a_task_on_a_live_connection_makes_no_health_check(monkeypatch):
    celery_app.loader.import_default_modules()
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

    celery_app.loader.import_default_modules()
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
