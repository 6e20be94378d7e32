"""A whole production stack in subprocesses, to break on purpose: a private Redis on its own port,
Celery worker(s), beat and the web server, all on the test databases. Orders go in over HTTP;
the test reads the service databases directly and kills, stops and restarts things."""

from __future__ import annotations

import base64
import json
import os
import shutil
import signal
import subprocess
import threading
import urllib.error
import urllib.request
from pathlib import Path

from django.conf import settings

from loadtest.processes import Process, answers, beat_command, serve_command, worker_command
from tests.processes import ARTIFACTS, database_urls, free_port, wait_for

PASSWORD = "chaos-pass"


class Stack:
    def __init__(self, name: str, *, step_timeout: float = 3.0, workers: int = 1, concurrency: int = 4) -> None:
        self.name = name
        self.redis_port = free_port()
        self.web_port = free_port()
        self.workers = workers
        self.concurrency = concurrency
        self.dir = ARTIFACTS / f"chaos-{name}"
        shutil.rmtree(self.dir, ignore_errors=True)
        self.dir.mkdir(parents=True)
        self.env = {
            **{k: v for k, v in os.environ.items() if not k.startswith(("DATABASE_URL", "REDIS_URL"))},
            **database_urls(),
            "REDIS_URL": f"redis://127.0.0.1:{self.redis_port}/0",
            "DJANGO_SETTINGS_MODULE": "sagaplatform.settings",
            "SAGA_STEP_TIMEOUT_OVERRIDE": str(step_timeout),
            "SAGA_SWEEP_INTERVAL": "0.5",
            "SAGA_ANTI_ENTROPY_INTERVAL": "2",
            "PAYMENT_GATEWAY_HANG_SECONDS": "5",
            "SHIPPING_HANDLING_SECONDS": "0",
        }
        self.processes: dict[str, Process] = {}
        # Workers run under supervision, as in production (systemd Restart=always): a worker that
        # exits on its own is started again. One the test kills on purpose is not.
        self.supervised: set[str] = set()
        self.queues: dict[str, list[str]] = {}  # each worker's queues, kept across restarts
        self.restarts = 0
        self._stopping = threading.Event()
        self._supervisor = threading.Thread(target=self._supervise, daemon=True)

    # --- processes --------------------------------------------------------------------------

    def _spawn(self, name: str, command: list[str]) -> Process:
        process = Process(name, command, env=self.env, log_path=self.dir / f"{name}.log").start()
        self.processes[name] = process
        return process

    def start_redis(self) -> None:
        self._spawn(
            "redis",
            ["redis-server", "--port", str(self.redis_port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
        )
        wait_for(lambda: self.redis_ping(), timeout=10, message="redis to answer")

    def stop_redis(self) -> None:
        self.kill("redis", signal.SIGKILL)  # no persistence: everything queued is lost

    def redis_ping(self) -> bool:
        import redis

        try:
            return redis.Redis(port=self.redis_port, socket_connect_timeout=0.5).ping()
        except redis.RedisError:
            return False

    def _supervise(self) -> None:
        while not self._stopping.wait(0.5):
            for name in list(self.supervised):
                if not self.processes[name].running() and not self._stopping.is_set():
                    self.restarts += 1
                    self.start_worker(int(name.removeprefix("worker")), wait=False)

    def start_worker(self, index: int = 0, *, wait: bool = True, queues: list[str] | None = None) -> None:
        name = f"worker{index}"
        queues = self.queues.setdefault(name, queues or list(settings.SAGA_QUEUES))
        command = worker_command(
            queues=queues, name=f"{self.name}-{index}-{os.urandom(2).hex()}@%h", concurrency=self.concurrency
        )
        ready_before = self.log(name).count(" ready.")
        worker = self._spawn(name, command)
        self.supervised.add(name)
        if wait:
            worker.wait_for_log(" ready.", count=ready_before + 1)

    def start_beat(self) -> None:
        schedule = self.dir / "beat-schedule"
        self._spawn("beat", beat_command(schedule=schedule))

    def start_web(self) -> None:
        web = self._spawn("web", serve_command(port=self.web_port))
        web.wait_until(lambda: answers(f"http://127.0.0.1:{self.web_port}"), timeout=30, message="web server")

    def start(self) -> Stack:
        self.start_redis()
        for index in range(self.workers):
            self.start_worker(index)
        self.start_beat()
        self.start_web()
        self._supervisor.start()
        return self

    def kill(self, name: str, sig: int = signal.SIGKILL) -> None:
        self.supervised.discard(name)
        process = self.processes.get(name)
        if process and process.running():
            process.stop(sig=sig, timeout=30)

    def worker_children(self, index: int = 0) -> list[int]:
        main = self.processes[f"worker{index}"].pid
        out = subprocess.run(["ps", "-o", "pid=", "--ppid", str(main)], capture_output=True, text=True).stdout
        return [int(pid) for pid in out.split()]

    def stop(self) -> None:
        self._stopping.set()
        for name in ("web", "beat", *[n for n in self.processes if n.startswith("worker")], "redis"):
            self.kill(name, signal.SIGTERM if name != "redis" else signal.SIGKILL)

    def log(self, name: str) -> str:
        process = self.processes.get(name)
        path = self.dir / f"{name}.log"
        return process.log() if process else (path.read_text() if path.exists() else "")

    # --- HTTP -------------------------------------------------------------------------------

    def call(self, username: str, method: str, path: str, body: dict | None = None) -> tuple[int, dict]:
        token = base64.b64encode(f"{username}:{PASSWORD}".encode()).decode()
        request = urllib.request.Request(
            f"http://127.0.0.1:{self.web_port}{path}",
            method=method,
            data=json.dumps(body).encode() if body is not None else None,
            headers={"Authorization": f"Basic {token}", "Content-Type": "application/json"},
        )
        try:
            with urllib.request.urlopen(request, timeout=15) as response:
                return response.status, json.loads(response.read())
        except urllib.error.HTTPError as error:
            return error.code, json.loads(error.read())


def artifacts_dir() -> Path:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    return ARTIFACTS
