"""The Celery application shared by the web process, the workers and beat."""

from __future__ import annotations

import os

from celery import Celery, Task
from celery.signals import task_failure, task_postrun, task_prerun

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "sagaplatform.settings")


class SagaTask(Task):
    # A task whose pool process died is sent again (task_retry_on_worker_lost) after this delay,
    # 180 s by Celery's default: it would wait out every step lease. Sent again at once, it
    # carries no countdown a worker would hold unacknowledged; max_retries still bounds a message
    # that kills its worker every time.
    default_retry_delay = 0


app = Celery("sagaplatform", task_cls=SagaTask)
app.config_from_object("django.conf:settings", namespace="CELERY")
app.autodiscover_tasks(["sagaplatform.kernel"])
app.autodiscover_tasks()


@task_prerun.connect
@task_postrun.connect
def recycle_database_connections(**kwargs) -> None:
    """Treat each task like Django treats each request.

    Connections are kept across tasks (CELERY_DB_REUSE_MAX stops Celery closing them all after
    every task, which cost a new PostgreSQL session per task), so they must be checked the way
    Django checks them around a request: drop one that broke or outlived CONN_MAX_AGE, and
    health-check the next use (CONN_HEALTH_CHECKS). Without this a worker keeps a connection to
    a restarted PostgreSQL server forever.
    """
    from django.db import close_old_connections

    close_old_connections()


# Worker heartbeats (the dashboard's "live workers"): connects to the worker's signals.
from sagaplatform import workers  # noqa: E402, F401

# A task that fails on what its message says is recorded as a dead letter (its message is
# acknowledged, so it would otherwise be gone with only a log line).
from sagaplatform.kernel.deadletters import record_failed_task  # noqa: E402

task_failure.connect(record_failed_task, weak=False)
