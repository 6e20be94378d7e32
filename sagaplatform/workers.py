"""Which workers are alive and how deep their queues are, for the dashboard and /healthz.

Each worker registers the service instances it hosts in the service registry
(`sagaplatform/kernel/registry.py`) and renews them every WORKER_HEARTBEAT_SECONDS (a thread
started when the worker is ready), with the age of its oldest running task; an instance expires
SAGA_REGISTRY_TTL (three beats) after its last heartbeat. In the embedded mode the workers are
threads of the web process, and register the same way.
"""

from __future__ import annotations

import atexit
import logging
import os
import socket
import threading
from datetime import datetime

from celery.signals import worker_ready, worker_shutdown
from django.conf import settings
from django.db import close_old_connections

from sagaplatform.kernel import registry

logger = logging.getLogger(__name__)

_stop = threading.Event()
_registered: list[str] = []  # the workers this process registered (deregistered at shutdown)


def announce(name: str, queues: list[str], *, started_at: datetime | None = None) -> None:
    """Register (or renew) worker `name`'s instances, one per service of `queues`."""
    instances = registry.describe(name, queues, host=socket.gethostname(), pid=os.getpid(), started_at=started_at)
    registry.backend().heartbeat(instances, ttl=registry.ttl())
    registry.invalidate()


def withdraw(name: str) -> None:
    registry.backend().deregister(name)
    registry.invalidate()


def live_workers() -> list[dict]:
    """The live workers, each with the queues it consumes (from the registry's live instances)."""
    by_worker: dict[str, dict] = {}
    try:
        view = registry.snapshot_view()
    except Exception:  # /healthz reports what is down; it must not fail on it
        logger.warning("service registry not readable", exc_info=True)
        return []
    for instance in view["instances"]:
        if not instance["alive"]:
            continue
        worker = by_worker.setdefault(
            instance["worker"],
            {
                "name": instance["worker"],
                "queues": [],
                "host": instance["host"],
                "pid": instance["pid"],
                "seen_at": instance["heartbeat_at"],
                "heartbeat_age": instance["heartbeat_age"],
            },
        )
        worker["queues"] = sorted({*worker["queues"], *instance["queues"]})
    return sorted(by_worker.values(), key=lambda w: w["name"])


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
    """Register this worker now and every WORKER_HEARTBEAT_SECONDS until it shuts down."""
    _stop.clear()
    if not _registered:
        atexit.register(stop_heartbeat)  # the embedded mode has no worker_shutdown signal
    _registered.append(name)

    def beat() -> None:
        while not _stop.is_set():
            try:
                announce(name, queues)
            except Exception:
                logger.warning("worker heartbeat failed", exc_info=True)
                close_old_connections()  # a broken connection is replaced at the next beat
            _stop.wait(settings.WORKER_HEARTBEAT_SECONDS)

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
    """A clean shutdown deregisters at once; a killed worker's instances expire instead."""
    _stop.set()
    while _registered:
        name = _registered.pop()
        try:
            withdraw(name)
        except Exception:
            logger.warning("worker %s: not deregistered; its instances will expire", name, exc_info=True)
