"""The service registry: which instances of each service are alive, where, and running what.

Every worker process registers the services it hosts (one *instance* per service: its queues,
host, pid, code version and the saga definition versions it knows) and renews them every
WORKER_HEARTBEAT_SECONDS with the age of its oldest running task (`sagaplatform/workers.py`).
An instance is live until its `expires_at` (SAGA_REGISTRY_TTL after its last heartbeat, on the
registry's clock); a worker that shuts down cleanly deregisters, one that is killed expires.

Where the instances are kept is a backend (`RegistryBackend`), named by SAGA_REGISTRY_BACKEND:
the database (`DatabaseRegistry`, the `ServiceInstance` table on `default`) by default. A Consul
or Kubernetes registry is another subclass; nothing else changes.

The orchestrator asks `resolve(service)` where to send a service's commands: a queue a live
instance of it consumes (its own queue, named after it, when one does). The answer comes from a
snapshot of the live set kept in the process for SAGA_REGISTRY_CACHE_SECONDS. Refreshing it is
one query bounded by SAGA_REGISTRY_TIMEOUT (PostgreSQL's statement timeout), made by one thread
at a time: the others keep using the last snapshot. An unreadable registry never stops a send:
the last good snapshot serves for a TTL, after that the answer is "unknown" and commands go to
the service's own queue, as without a registry.
"""

from __future__ import annotations

import logging
import subprocess
import threading
import time
from abc import ABC, abstractmethod
from dataclasses import dataclass
from datetime import datetime, timedelta
from functools import cache
from pathlib import Path
from typing import Any

from django.conf import settings
from django.db import connections, transaction
from django.utils.module_loading import import_string

from .clock import db_now

logger = logging.getLogger(__name__)

DB = "default"


@dataclass(frozen=True)
class Instance:
    """One service hosted by one worker process."""

    worker: str
    service: str
    queues: tuple[str, ...]
    host: str
    pid: int
    code_version: str = ""
    definitions: tuple[str, ...] = ()
    started_at: datetime | None = None
    heartbeat_at: datetime | None = None
    expires_at: datetime | None = None
    tasks_running: int = 0
    oldest_task_age: float | None = None

    @property
    def key(self) -> str:
        return f"{self.worker}/{self.service}"

    def alive(self, now: datetime) -> bool:
        return self.expires_at is not None and self.expires_at > now


class RegistryBackend(ABC):
    """Where the registry keeps its instances. Every method may raise when the store cannot be
    reached; the callers (the heartbeat, `resolve`) log it and carry on."""

    @abstractmethod
    def heartbeat(self, instances: list[Instance], *, ttl: float) -> None:
        """Register `instances` (those of one worker), or renew them: live for `ttl` s more."""

    @abstractmethod
    def deregister(self, worker: str) -> None:
        """Forget every instance of `worker` (it is shutting down)."""

    @abstractmethod
    def instances(self) -> tuple[datetime, list[Instance]]:
        """The registry's clock now, and every instance it knows (expired ones included, until
        it forgets them)."""


class DatabaseRegistry(RegistryBackend):
    """The `ServiceInstance` table on `default`, on the database clock."""

    def heartbeat(self, instances: list[Instance], *, ttl: float) -> None:
        from .models import ServiceInstance

        with transaction.atomic(using=DB):
            now = db_now(DB)
            for instance in instances:
                fields = {
                    "worker": instance.worker,
                    "service": instance.service,
                    "queues": list(instance.queues),
                    "host": instance.host,
                    "pid": instance.pid,
                    "code_version": instance.code_version[:64],
                    "definitions": list(instance.definitions),
                    "heartbeat_at": now,
                    "expires_at": now + timedelta(seconds=ttl),
                    "tasks_running": instance.tasks_running,
                    "oldest_task_age": instance.oldest_task_age,
                }
                ServiceInstance.objects.using(DB).update_or_create(
                    instance=instance.key,
                    defaults=fields,
                    create_defaults={**fields, "started_at": instance.started_at or now},
                )
            # Forget instances that expired long ago (the dashboard shows the recent ones).
            forget = now - timedelta(seconds=settings.SAGA_REGISTRY_FORGET_AFTER)
            ServiceInstance.objects.using(DB).filter(expires_at__lt=forget).delete()

    def deregister(self, worker: str) -> None:
        from .models import ServiceInstance

        ServiceInstance.objects.using(DB).filter(worker=worker).delete()

    def instances(self) -> tuple[datetime, list[Instance]]:
        from .models import ServiceInstance

        connection = connections[DB]
        bounded = connection.vendor == "postgresql" and settings.SAGA_REGISTRY_TIMEOUT > 0
        # A savepoint inside the engine's transaction (or a transaction of its own): the
        # statement timeout applies to these queries only, and a timed-out query rolls back
        # the savepoint, not the engine's work.
        with transaction.atomic(using=DB):
            if bounded:
                with connection.cursor() as cursor:
                    cursor.execute(f"SET LOCAL statement_timeout = {int(settings.SAGA_REGISTRY_TIMEOUT * 1000)}")
            now = db_now(DB)
            rows = list(ServiceInstance.objects.using(DB).all())
            if bounded:
                with connection.cursor() as cursor:
                    cursor.execute("SET LOCAL statement_timeout TO DEFAULT")
        return now, [
            Instance(
                worker=row.worker,
                service=row.service,
                queues=tuple(row.queues or ()),
                host=row.host,
                pid=row.pid,
                code_version=row.code_version,
                definitions=tuple(row.definitions or ()),
                started_at=row.started_at,
                heartbeat_at=row.heartbeat_at,
                expires_at=row.expires_at,
                tasks_running=row.tasks_running,
                oldest_task_age=row.oldest_task_age,
            )
            for row in rows
        ]


_backends: dict[str, RegistryBackend] = {}


def backend() -> RegistryBackend:
    """The backend SAGA_REGISTRY_BACKEND names (one per process)."""
    path: str = settings.SAGA_REGISTRY_BACKEND
    found = _backends.get(path)
    if found is None:
        found = _backends[path] = import_string(path)()
        if not isinstance(found, RegistryBackend):
            raise TypeError(f"SAGA_REGISTRY_BACKEND {path} is not a RegistryBackend")
    return found


# --- What a worker registers --------------------------------------------------------------------


def service_of(queue: str) -> str:
    """The service a queue belongs to: its name, up to a first dot (`payments`, `payments.eu`)."""
    return queue.split(".", 1)[0]


def code_version() -> str:
    """SAGA_CODE_VERSION, else the checkout's git commit, else "unknown"."""
    return str(settings.SAGA_CODE_VERSION) if settings.SAGA_CODE_VERSION else _git_commit()


@cache
def _git_commit() -> str:
    try:
        found = subprocess.run(
            ["git", "rev-parse", "--short=12", "HEAD"],  # noqa: S607
            cwd=Path(__file__).resolve().parent,
            capture_output=True,
            text=True,
            timeout=5,
            check=True,
        )
        return found.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def definition_versions() -> tuple[str, ...]:
    """The saga definition versions this process runs: "name vN (digest)"."""
    try:
        from orchestration.definitions import DEFINITIONS
    except Exception:  # a process without the orchestrator's app: nothing to tell
        return ()
    return tuple(sorted(f"{d.label} ({d.digest[:12]})" for d in DEFINITIONS.values()))


def running_tasks() -> tuple[int, float | None]:
    """Tasks this worker runs now, and the age in seconds of the oldest (Celery's worker state,
    which the main process keeps for its pool: prefork children and threads alike)."""
    from celery.worker import state

    starts = [r.time_start for r in list(state.active_requests) if getattr(r, "time_start", None)]
    if not starts:
        return len(starts), None
    return len(starts), round(max(0.0, time.time() - min(starts)), 3)


def describe(worker: str, queues: list[str], *, host: str, pid: int, started_at: datetime | None) -> list[Instance]:
    """The instances a worker consuming `queues` hosts: one per service."""
    by_service: dict[str, list[str]] = {}
    for queue in queues:
        by_service.setdefault(service_of(queue), []).append(queue)
    running, oldest = running_tasks()
    version, known = code_version(), definition_versions()
    return [
        Instance(
            worker=worker,
            service=service,
            queues=tuple(sorted(served)),
            host=host,
            pid=pid,
            code_version=version,
            definitions=known,
            started_at=started_at,
            tasks_running=running,
            oldest_task_age=oldest,
        )
        for service, served in sorted(by_service.items())
    ]


def ttl() -> float:
    return float(settings.SAGA_REGISTRY_TTL or settings.WORKER_HEARTBEAT_SECONDS * 3)


# --- What the orchestrator reads ------------------------------------------------------------------


@dataclass(frozen=True)
class Resolution:
    queue: str  # where to send the service's commands
    live: bool | None  # a live instance serves it (None: unknown: no discovery, or no registry)


@dataclass
class _Snapshot:
    fetched: float  # time.monotonic()
    read_ok: float  # when the registry last answered (monotonic)
    services: dict[str, tuple[str, ...]] | None  # service -> the queues its live instances consume


_snapshot: _Snapshot | None = None
_refreshing = threading.Lock()


def invalidate() -> None:
    """Forget the snapshot (after this process registered something, and in tests)."""
    global _snapshot
    _snapshot = None


def live_services() -> dict[str, tuple[str, ...]] | None:
    """{service: queues its live instances consume}, at most SAGA_REGISTRY_CACHE_SECONDS old;
    None when the registry could not be read for a TTL (or ever, in this process)."""
    global _snapshot
    snapshot, now = _snapshot, time.monotonic()
    if snapshot is not None and now - snapshot.fetched < settings.SAGA_REGISTRY_CACHE_SECONDS:
        return snapshot.services
    if not _refreshing.acquire(blocking=False):
        return snapshot.services if snapshot else None  # another thread is asking: never wait
    try:
        try:
            registry_now, found = backend().instances()
        except Exception:
            logger.warning("service registry not readable; using the last live set", exc_info=True)
            stale = snapshot is not None and now - snapshot.read_ok < ttl()
            services = snapshot.services if stale and snapshot else None
            _snapshot = _Snapshot(fetched=now, read_ok=snapshot.read_ok if snapshot else 0.0, services=services)
            return services
        live: dict[str, set[str]] = {}
        for instance in found:
            if instance.alive(registry_now):
                live.setdefault(instance.service, set()).update(instance.queues)
        services = {service: tuple(sorted(queues)) for service, queues in live.items()}
        _snapshot = _Snapshot(fetched=now, read_ok=now, services=services)
        return services
    finally:
        _refreshing.release()


def resolve(service: str) -> Resolution:
    """Where to send `service`'s commands. Its own queue if a live instance consumes it (or if
    discovery is off, or the registry unknown); else another queue its live instances consume."""
    if not settings.SAGA_REGISTRY_DISCOVERY:
        return Resolution(service, None)
    live = live_services()
    if live is None:
        return Resolution(service, None)
    queues = live.get(service)
    if not queues:
        return Resolution(service, False)
    return Resolution(service if service in queues else queues[0], True)


def snapshot_view() -> dict[str, Any]:
    """Every known instance as plain data (the dashboard, the metrics, /healthz)."""
    registry_now, found = backend().instances()
    return {
        "now": registry_now,
        "instances": [
            {
                "instance": i.key,
                "worker": i.worker,
                "service": i.service,
                "queues": list(i.queues),
                "host": i.host,
                "pid": i.pid,
                "code_version": i.code_version,
                "definitions": list(i.definitions),
                "started_at": i.started_at.isoformat() if i.started_at else None,
                "heartbeat_at": i.heartbeat_at.isoformat() if i.heartbeat_at else None,
                "heartbeat_age": round((registry_now - i.heartbeat_at).total_seconds(), 3) if i.heartbeat_at else None,
                "tasks_running": i.tasks_running,
                "oldest_task_age": i.oldest_task_age,
                "alive": i.alive(registry_now),
            }
            for i in sorted(found, key=lambda i: (i.service, i.worker))
        ],
    }
