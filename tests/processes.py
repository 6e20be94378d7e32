"""Real processes for end-to-end tests: a Celery worker (+ beat) on the test databases, and the
embedded platform served by `manage.py serve`."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from urllib.parse import quote

from django.conf import settings
from django.db import connections

ROOT = Path(__file__).resolve().parent.parent
ARTIFACTS = ROOT / "test-artifacts"


def database_urls() -> dict[str, str]:
    """The test databases (as pytest-django created them) as DATABASE_URL_<ALIAS> variables."""
    urls = {}
    for alias in settings.DATABASE_ALIASES:
        db = connections[alias].settings_dict
        auth = quote(db["USER"]) + (f":{quote(db['PASSWORD'])}" if db["PASSWORD"] else "")
        urls[f"DATABASE_URL_{alias.upper()}"] = f"postgres://{auth}@{db['HOST']}:{db['PORT'] or 5432}/{db['NAME']}"
    return urls


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_for(predicate, *, timeout: float, interval: float = 0.1, message: str = "condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {message}")


class Worker:
    """`celery worker -B` consuming every queue, as production runs it (prefork, acks_late)."""

    def __init__(self, *, name: str = "e2e", concurrency: int = 2, extra_env: dict | None = None) -> None:
        ARTIFACTS.mkdir(exist_ok=True)
        self.log_path = ARTIFACTS / f"worker-{name}.log"
        self.name = name
        self.concurrency = concurrency
        self.extra_env = extra_env or {}
        self.process: subprocess.Popen | None = None

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
        beat_schedule = ARTIFACTS / f"beat-{self.name}"
        self.log = self.log_path.open("w")
        command = [sys.executable, "-m", "celery", "-A", "sagaplatform", "worker"]
        command += ["-Q", ",".join(settings.SAGA_QUEUES), "-c", str(self.concurrency), "-n", f"{self.name}@%h"]
        command += ["-B", "-s", str(beat_schedule), "--loglevel", "INFO"]
        self.process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=self.log, stderr=subprocess.STDOUT)
        wait_for(self._ready, timeout=60, message=f"worker {self.name} to be ready (log: {self.log_path})")
        return self

    def _ready(self) -> bool:
        if self.process.poll() is not None:
            raise AssertionError(f"worker exited with {self.process.returncode}; see {self.log_path}")
        return " ready." in self.log_path.read_text()

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        if self.process:
            self.log.close()


def flush_broker() -> None:
    import redis

    redis.Redis.from_url(settings.REDIS_URL).flushdb()
