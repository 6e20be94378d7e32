"""Which workers are alive and how deep their queues are, for the dashboard and /healthz.

Each worker announces itself in the cache every WORKER_HEARTBEAT_SECONDS (a thread started
when the worker is ready), with the queues it consumes; an announcement expires after three
missed beats. In production the cache is Redis, shared by every process; in the embedded mode
the workers are threads of the web process and share its memory.
"""

from __future__ import annotations

import logging
import math
import os
import socket
import threading
import time

from celery.signals import worker_ready, worker_shutdown
from django.conf import settings
from django.core.cache import cache

logger = logging.getLogger(__name__)

INDEX_KEY = "workers:index"
WORKER_KEY = "workers:{}"

_stop = threading.Event()


def announce(name: str, queues: list[str]) -> None:
    # Three missed beats; whole seconds (Redis expiries are, and 0 would mean "expire now").
    ttl = max(1, math.ceil(settings.WORKER_HEARTBEAT_SECONDS * 3))
    cache.set(
        WORKER_KEY.format(name), {"name": name, "queues": queues, "seen_at": time.time(), "pid": os.getpid()}, ttl
    )
    # The index is read-modify-write; a lost update is repaired at the next beat.
    names = set(cache.get(INDEX_KEY) or ())
    if name not in names:
        cache.set(INDEX_KEY, sorted(names | {name}), None)


def withdraw(name: str) -> None:
    cache.delete(WORKER_KEY.format(name))


def live_workers() -> list[dict]:
    names = cache.get(INDEX_KEY) or []
    found = cache.get_many([WORKER_KEY.format(n) for n in names])
    workers = sorted(found.values(), key=lambda w: w["name"])
    if len(found) < len(names):  # forget workers whose announcements expired
        cache.set(INDEX_KEY, [w["name"] for w in workers], None)
    return workers


def queue_depths() -> dict[str, int | None]:
    """Messages waiting in each service queue (None when the broker cannot be asked)."""
    from sagaplatform.celery import app

    depths: dict[str, int | None] = {}
    try:
        with app.connection_for_read() as connection:
            # Fail fast: this answers a health check or a dashboard tick, never waits for Redis.
            connection.ensure_connection(max_retries=1, interval_start=0, interval_step=0.2, timeout=2)
            channel = connection.default_channel
            for name in settings.SAGA_QUEUES:
                try:
                    depths[name] = channel.queue_declare(queue=name, passive=True).message_count
                except Exception:  # a queue no worker has declared yet
                    depths[name] = 0
    except Exception:
        logger.warning("queue depths: broker unreachable", exc_info=True)
        return dict.fromkeys(settings.SAGA_QUEUES)
    return depths


def start_heartbeat(name: str, queues: list[str]) -> None:
    """Announce this worker now and every WORKER_HEARTBEAT_SECONDS until it shuts down."""
    _stop.clear()

    def beat() -> None:
        while not _stop.is_set():
            try:
                announce(name, queues)
            except Exception:
                logger.warning("worker heartbeat failed", exc_info=True)
            _stop.wait(settings.WORKER_HEARTBEAT_SECONDS)
        withdraw(name)

    threading.Thread(target=beat, name="worker-heartbeat", daemon=True).start()


@worker_ready.connect
def _on_worker_ready(sender=None, **kwargs) -> None:
    """A `celery worker` process is ready (the embedded worker calls start_heartbeat itself:
    Celery sends this signal only from its command-line worker)."""
    hostname = getattr(sender, "hostname", None) or f"celery@{socket.gethostname()}"
    try:
        queues = sorted(q.name for q in sender.task_consumer.queues)
    except AttributeError:
        queues = list(settings.SAGA_QUEUES)
    start_heartbeat(hostname, queues)


@worker_shutdown.connect
def stop_heartbeat(**kwargs) -> None:
    _stop.set()
