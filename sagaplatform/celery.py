"""The Celery application shared by the web process, the workers and beat."""

from __future__ import annotations

import logging
import os
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
        """Run the task; if it failed on a database connection that has died (a restarted
        PostgreSQL server), reconnect and run it once more. Every task is idempotent (the
        barrier, the engine's attempt numbers, the outbox), and the failed run's transaction
        rolled back. This replaces the health check (`SELECT 1`) before each task's first
        query: the common case costs nothing, a dead connection one failed statement."""
        from django.db import InterfaceError, OperationalError

        try:
            return super().__call__(*args, **kwargs)
        except (OperationalError, InterfaceError):
            dead = _dead_connections()
            if not dead:
                raise
            logger.warning("task %s: database connection lost (%s); reconnecting and running it again", self.name, dead)
            _close_dead_connections()
            return super().__call__(*args, **kwargs)


logger = logging.getLogger(__name__)


def _dead_connections() -> list[str]:
    """The aliases whose connection failed and no longer answers."""
    from django.db import connections

    dead = []
    for connection in connections.all(initialized_only=True):
        if not connection.errors_occurred and not connection.closed_in_transaction:
            continue
        if connection.connection is None or not connection.is_usable():
            dead.append(connection.alias)
    return dead


def _close_dead_connections() -> None:
    from django.db import connections

    for alias in _dead_connections():
        connection = connections[alias]
        if connection.in_atomic_block:  # not in a task: its atomic blocks have all exited
            continue
        connection.close()


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
