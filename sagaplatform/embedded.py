"""The embedded mode: Celery workers and beat (the sweeper) as threads of the web process.

Celery runs on its in-memory transport, which lives and dies with the process: whatever was
queued when the process stopped is gone. Nothing more is needed to recover than in production,
where a Redis restart loses queued messages too: unpublished outbox rows are relayed, expired
step leases are retried, pending orders are announced again, queued notifications redelivered.
"""

from __future__ import annotations

import logging
import os
import socket
import threading

from celery.beat import EmbeddedService
from django.conf import settings

from sagaplatform import workers
from sagaplatform.celery import app

logger = logging.getLogger(__name__)


def start_worker(*, concurrency: int = 4) -> threading.Thread:
    worker = app.WorkController(
        pool="threads",
        concurrency=concurrency,
        queues=list(settings.SAGA_QUEUES),
        without_heartbeat=True,
        without_mingle=True,
        without_gossip=True,
        loglevel="WARNING",
    )
    thread = threading.Thread(target=worker.start, name="celery-embedded", daemon=True)
    thread.start()
    workers.start_heartbeat(f"embedded@{socket.gethostname()}:{os.getpid()}", list(settings.SAGA_QUEUES))
    return thread


def start_beat() -> None:
    """Celery beat as a thread: a separate beat process could not reach the in-memory broker."""
    settings.VAR_DIR.mkdir(parents=True, exist_ok=True)
    EmbeddedService(app, thread=True, schedule_filename=str(settings.VAR_DIR / "celerybeat-schedule")).start()


def start(*, concurrency: int = 4) -> None:
    start_worker(concurrency=concurrency)
    start_beat()
