"""Real processes for end-to-end tests: a Celery worker (+ beat) on the test databases, and the
embedded platform served by `manage.py serve`."""

from __future__ import annotations

import json
import logging
import os
import time
from urllib.parse import quote

from django.conf import settings
from django.db import connections

from loadtest.processes import ROOT, Process, free_port, wait_for, worker_command

__all__ = ["ARTIFACTS", "ROOT", "Worker", "database_urls", "flush_broker", "free_port", "wait_for", "wait_until_quiet"]

# What the slow tiers leave to look at (process logs, outputs), in a directory per xdist worker
# (test-artifacts/gw0/...): two tests on two workers may start processes of the same name.
ARTIFACTS = ROOT / "test-artifacts" / os.environ.get("PYTEST_XDIST_WORKER", "")


def database_urls() -> dict[str, str]:
    """The test databases (as pytest-django created them) as DATABASE_URL_<ALIAS> variables."""
    urls = {}
    for alias in settings.DATABASE_ALIASES:
        db = connections[alias].settings_dict
        auth = quote(db["USER"]) + (f":{quote(db['PASSWORD'])}" if db["PASSWORD"] else "")
        urls[f"DATABASE_URL_{alias.upper()}"] = f"postgres://{auth}@{db['HOST']}:{db['PORT'] or 5432}/{db['NAME']}"
    return urls


class Worker:
    """`celery worker -B` consuming every queue, as production runs it (prefork, acks_late)."""

    def __init__(
        self,
        *,
        name: str = "e2e",
        concurrency: int = 2,
        extra_env: dict | None = None,
        queues: tuple[str, ...] | None = None,
        beat: bool = True,
    ) -> None:
        self.log_path = ARTIFACTS / f"worker-{name}.log"
        self.name = name
        self.concurrency = concurrency
        self.extra_env = extra_env or {}
        self.queues = queues or settings.SAGA_QUEUES
        self.beat = beat
        self.process: Process | None = None

    def start(self) -> Worker:
        env = {
            **os.environ,
            **database_urls(),
            "REDIS_URL": settings.REDIS_URL,
            "SAGA_SWEEP_INTERVAL": "1",
            "SHIPPING_HANDLING_SECONDS": "0",
            "DJANGO_SETTINGS_MODULE": "sagaplatform.settings",
            **self.extra_env,
        }
        env.pop("DATABASE_URL", None)
        self.log_path.unlink(missing_ok=True)
        command = worker_command(
            queues=self.queues,
            name=f"{self.name}@%h",
            concurrency=self.concurrency,
            beat_schedule=ARTIFACTS / f"beat-{self.name}" if self.beat else None,
        )
        self.process = Process(f"worker {self.name}", command, env=env, log_path=self.log_path).start()
        self.process.wait_for_log(" ready.")
        return self

    def stop(self) -> None:
        if self.process:
            self.process.stop()


def flush_broker() -> None:
    import redis

    redis.Redis.from_url(settings.REDIS_URL).flushdb()


def wait_until_quiet(*, timeout: float = 30) -> bool:
    """Wait until no saga message is queued or held by a worker (beat's periodic sweeps do not
    count). Before a test's databases are flushed, this keeps a late message of that test from
    landing in the next one's (the choreography tracker rebuilds a saga from any event)."""
    import redis

    client = redis.Redis.from_url(settings.REDIS_URL)
    periodic = {entry["task"] for entry in settings.CELERY_BEAT_SCHEDULE.values()}

    def task_of(raw: bytes | str) -> str:
        message = json.loads(raw)
        message = message[0] if isinstance(message, list) else message  # unacked: [message, ...]
        return message.get("headers", {}).get("task", "")

    def quiet() -> bool:
        pending = [raw for queue in settings.SAGA_QUEUES for raw in client.lrange(queue, 0, -1)]
        pending += client.hvals("unacked")
        return all(task_of(raw) in periodic for raw in pending)

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if quiet():
            time.sleep(0.5)  # a task just acknowledged may still be committing
            return True
        time.sleep(0.2)
    pending = [raw for queue in settings.SAGA_QUEUES for raw in client.lrange(queue, 0, -1)] + client.hvals("unacked")
    logging.getLogger(__name__).warning("broker not quiet after %ss: %s", timeout, [task_of(r) for r in pending])
    return False
