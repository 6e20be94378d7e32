"""Process and task lifecycle hooks (Celery signals, django-structlog's signals)."""

from __future__ import annotations

import os
from datetime import datetime

from celery import signals as celery_signals
from django.conf import settings

from . import logging as saga_logging
from . import metrics

ENQUEUED_HEADER = "saga_enqueued_at"


def message_headers(message) -> dict:
    """Headers an outbox message is published with: when it became due (the queue wait runs
    from there). Its trace context is added by the Celery instrumentation (see outbox.publish)."""
    due = message.available_at if isinstance(message.available_at, datetime) else message.created_at
    return {ENQUEUED_HEADER: due.timestamp()} if isinstance(due, datetime) else {}


def _queue(task) -> str:
    info = getattr(task.request, "delivery_info", None) or {}
    queue = info.get("routing_key") or info.get("queue") or ""
    return queue if queue in settings.SAGA_QUEUES else "other"


def _task_started(sender=None, task=None, **kwargs) -> None:
    if task is None or not metrics.ENABLED:
        return
    queue = _queue(task)
    metrics.child(metrics.TASKS_IN_PROGRESS, queue).inc()
    enqueued = getattr(task.request, ENQUEUED_HEADER, None)
    if enqueued is not None:
        metrics.queue_wait(queue, enqueued)


def _task_finished(sender=None, task=None, **kwargs) -> None:
    if task is not None and metrics.ENABLED:
        metrics.child(metrics.TASKS_IN_PROGRESS, _queue(task)).dec()


def _worker_starting(**kwargs) -> None:
    metrics.remove_stale_files()


def _child_exited(pid=None, **kwargs) -> None:
    metrics.process_exited(pid or os.getpid())


_receivers: list = []


def connect() -> None:
    from django_structlog.celery import signals as structlog_celery_signals
    from django_structlog.celery.receivers import CeleryReceiver

    # django-structlog's task lines and context (task id, the publisher's request id): connected
    # here once for every process, web and workers alike (its Django-setting switch would connect
    # the publish receivers a second time in workers).
    receiver = CeleryReceiver()
    receiver.connect_worker_signals()
    _receivers.append(receiver)

    celery_signals.task_prerun.connect(_task_started, weak=False)
    celery_signals.task_postrun.connect(_task_finished, weak=False)
    celery_signals.worker_init.connect(_worker_starting, weak=False)
    celery_signals.beat_init.connect(_worker_starting, weak=False)
    celery_signals.worker_process_shutdown.connect(_child_exited, weak=False)
    structlog_celery_signals.bind_extra_task_metadata.connect(saga_logging.bind_task, weak=False)
    structlog_celery_signals.modify_context_before_task_publish.connect(saga_logging.unbind_saga_fields, weak=False)
