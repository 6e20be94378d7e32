"""The embedded mode: Celery workers and the sweeper as threads of the web process.

Celery runs on its in-memory transport, which lives and dies with the process. Whatever the
process had queued when it last stopped is gone, so at start-up the outboxes' recent messages
are published again; every consumer is idempotent (barrier, step attempts), so a message that
had in fact been handled is a no-op.
"""

from __future__ import annotations

import logging
import threading
import time
from datetime import timedelta

from django.conf import settings
from django.db import close_old_connections
from django.utils import timezone

from sagaplatform.celery import app
from sagaplatform.kernel.models import OutboxMessage

logger = logging.getLogger(__name__)

REPLAY_WINDOW = timedelta(hours=1)


def replay_recent_messages() -> int:
    """Mark the last hour's published messages unpublished again, for the sweep to resend."""
    since = timezone.now() - REPLAY_WINDOW
    total = 0
    for alias in settings.DATABASE_ALIASES:
        total += (
            OutboxMessage.objects.using(alias)
            .filter(published_at__isnull=False, published_at__gte=since)
            .update(published_at=None, available_at=timezone.now() - timedelta(minutes=1))
        )
    return total


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
    return thread


def start_sweeper(*, interval: float | None = None) -> threading.Thread:
    from orchestration.tasks import sweep

    period = interval or settings.SAGA_SWEEP_INTERVAL

    def loop() -> None:
        while True:
            time.sleep(period)
            try:
                sweep.delay()
            except Exception:
                logger.exception("sweep failed")
            finally:
                close_old_connections()

    thread = threading.Thread(target=loop, name="saga-sweeper", daemon=True)
    thread.start()
    return thread


def start(*, concurrency: int = 4) -> None:
    replayed = replay_recent_messages()
    if replayed:
        logger.warning("embedded start: %d recent messages will be published again", replayed)
    start_worker(concurrency=concurrency)
    start_sweeper()
