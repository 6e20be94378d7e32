"""The Celery application shared by the web process, the workers and beat."""

from __future__ import annotations

import logging
import os
import time
from typing import Any

from celery import Celery, Task
from celery.signals import task_failure, task_postrun, task_prerun

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "sagaplatform.settings")


class SagaTask(Task):
    # A task whose pool process died is sent again (task_retry_on_worker_lost) after this delay,
    # 180 s by Celery's default: it would wait out every step lease. Sent again at once, it
    # carries no countdown a worker would hold unacknowledged; max_retries still bounds a message
    # that kills its worker every time.
    default_retry_delay = 0

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        """Run the task; if it failed because the database server dropped its connections (a
        restarted PostgreSQL server), replace every dead connection and run it again. Every task
        is idempotent (the barrier, the engine's attempt numbers, the outbox), and the failed
        run's transaction rolled back. This replaces the health check (`SELECT 1`) before each
        task's first query: the common case costs nothing, a dead connection one failed
        statement and a check of each connection the process holds."""
        from django.db import InterfaceError, NotSupportedError, OperationalError

        replanned = False
        for delay in (*RECONNECT_DELAYS, None):
            try:
                return super().__call__(*args, **kwargs)
            except NotSupportedError as exc:
                # A migration changed what a statement this process prepared returns (see
                # DATABASE_PREPARED_STATEMENTS): PostgreSQL refuses that statement on this session
                # until it is prepared again. New sessions prepare it afresh; run once more.
                if replanned or not _stale_plan(exc):
                    raise
                replanned = True
                logger.warning(
                    "task %s: a prepared statement went stale (%s); reconnecting and running it again", self.name, exc
                )
                _close_idle_connections()
            except (OperationalError, InterfaceError) as exc:
                # A restart kills every database's session at once, but the task meets them
                # one at a time: check them all, not only the one that failed. The failed one
                # may already be replaced (a failed rollback closes it, and leaving
                # `transaction.atomic` opens a new one), so the error itself says what it was.
                dead = _close_dead_connections()
                if delay is None or not (dead or _lost_connection(exc)):
                    raise
                logger.warning(
                    "task %s: database connection lost (%s); reconnecting and running it again",
                    self.name,
                    ", ".join(dead) or exc,
                )
                if delay:
                    time.sleep(delay)  # the server may still be starting
        raise AssertionError("not reached")


logger = logging.getLogger(__name__)

# The pauses before each further run of a task whose database connection was lost: the first
# at once (the server is back, only this process's sessions died), then while it starts up.
RECONNECT_DELAYS = (0.0, 0.5, 2.0)
# SQLSTATEs that mean the session is gone: class 08 (connection exception), and the server's
# shutdown (57P01 admin shutdown, 57P02 crash shutdown, 57P03 cannot connect now).
_LOST_SQLSTATES = ("08", "57P01", "57P02", "57P03")


def _lost_connection(exc: BaseException) -> bool:
    """Whether a database error means the connection was lost (not a timeout, a lock, a bad
    statement): the server's shutdown codes, or a client-side error with no SQLSTATE (the
    socket closed, "the connection is closed")."""
    import psycopg

    cause = exc.__cause__ if isinstance(exc.__cause__, psycopg.Error) else None
    if cause is None:
        return False
    if cause.sqlstate is None:
        return isinstance(cause, psycopg.OperationalError | psycopg.InterfaceError)
    return cause.sqlstate.startswith(_LOST_SQLSTATES)


def _stale_plan(exc: BaseException) -> bool:
    """Whether a database error is PostgreSQL refusing a prepared statement whose result type a
    schema change altered ("cached plan must not change result type", SQLSTATE 0A000)."""
    cause = exc.__cause__
    return getattr(cause, "sqlstate", None) == "0A000" and "cached plan" in str(cause)


def _close_idle_connections() -> None:
    """Close this thread's connections outside a transaction (their sessions' prepared statements
    go with them); each opens again at its next query."""
    from django.db import connections

    for connection in connections.all(initialized_only=True):
        if connection.connection is not None and not connection.in_atomic_block:
            connection.close()


def _close_dead_connections() -> list[str]:
    """Close this thread's connections that no longer answer (outside a transaction); return
    their aliases."""
    from django.db import connections

    dead = []
    for connection in connections.all(initialized_only=True):
        if connection.connection is None or connection.in_atomic_block:
            continue
        if not connection.is_usable():
            connection.close()
            dead.append(connection.alias)
    return dead


app = Celery("sagaplatform", task_cls=SagaTask)
app.config_from_object("django.conf:settings", namespace="CELERY")
app.autodiscover_tasks(["sagaplatform.kernel"])
app.autodiscover_tasks()


@task_prerun.connect
@task_postrun.connect
def recycle_database_connections(**kwargs) -> None:
    """Treat each task like Django treats each request, less the health check.

    Connections are kept across tasks (CELERY_DB_REUSE_MAX stops Celery closing them all after
    every task, which cost a new PostgreSQL session per task), so they must be checked the way
    Django checks them around a request: drop one that broke or outlived CONN_MAX_AGE. Without
    this a worker keeps a connection to a restarted PostgreSQL server forever. The health check
    before each task's first query (CONN_HEALTH_CHECKS, a `SELECT 1` per database per task, 8%
    of an order's round trips) is skipped: a task that fails on a dead connection reconnects
    and runs again instead (`SagaTask.__call__`).
    """
    from django.db import close_old_connections, connections

    close_old_connections()
    for connection in connections.all(initialized_only=True):
        if connection.connection is not None and not connection.errors_occurred:
            connection.health_check_done = True  # type: ignore[attr-defined]  # Django's, untyped


# Worker heartbeats (the dashboard's "live workers"): connects to the worker's signals.
from sagaplatform import workers  # noqa: E402, F401

# A task that fails on what its message says is recorded as a dead letter (its message is
# acknowledged, so it would otherwise be gone with only a log line).
from sagaplatform.kernel.deadletters import record_failed_task  # noqa: E402

task_failure.connect(record_failed_task, weak=False)
