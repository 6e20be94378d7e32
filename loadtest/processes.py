"""Start, watch and stop the platform's own processes: Celery workers and beat, and the web server
(`manage.py serve`). One helper for the benchmarks, the ramp, the simulation and the tests
(`tests/processes.py` and `tests/chaos.py` build their workers and stacks on it).

Every process runs from the repository root with this interpreter, in its own session (so a
signal reaches a prefork worker's pool children too), its output appended to a log file.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import IO, TypeVar

ROOT = Path(__file__).resolve().parent.parent

T = TypeVar("T")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_for(predicate: Callable[[], T], *, timeout: float, interval: float = 0.1, message: str = "condition") -> T:
    """Poll `predicate` until it returns something truthy, and return that; fail after `timeout`."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {message}")


def answers(base_url: str, path: str = "/healthz") -> bool:
    """Whether the web server at `base_url` answers `path` with a 2xx (a 503 is an OSError too)."""
    try:
        with urllib.request.urlopen(base_url + path, timeout=2):  # noqa: S310 (our own server)
            return True
    except OSError:
        return False


def celery(*args: str) -> list[str]:
    return [sys.executable, "-m", "celery", "-A", "sagaplatform", *args]


def worker_command(
    *,
    queues: Iterable[str],
    name: str,
    concurrency: int = 2,
    loglevel: str = "INFO",
    beat_schedule: Path | None = None,
    include: Iterable[str] = (),
) -> list[str]:
    """`celery worker` on `queues`; with `beat_schedule`, beat runs inside it (`-B`); `include`
    imports extra task modules (the benchmark's bare chain)."""
    command = celery("worker", "-Q", ",".join(queues), "-c", str(concurrency), "-n", name, "--loglevel", loglevel)
    if beat_schedule is not None:
        command += ["-B", "-s", str(beat_schedule)]
    if include:
        command += ["--include", ",".join(include)]
    return command


def beat_command(*, schedule: Path, loglevel: str = "INFO") -> list[str]:
    return celery("beat", "-s", str(schedule), "--loglevel", loglevel)


def serve_command(*, port: int) -> list[str]:
    return [sys.executable, "manage.py", "serve", "--port", str(port)]


class Process:
    """One child process with its log file."""

    def __init__(self, name: str, command: list[str], *, env: Mapping[str, str], log_path: Path | None) -> None:
        self.name = name
        self.command = command
        self.env = dict(env)
        self.log_path = log_path
        self.popen: subprocess.Popen | None = None

    def start(self) -> Process:
        out: int | IO[str]
        if self.log_path is None:
            out = subprocess.DEVNULL
        else:
            self.log_path.parent.mkdir(parents=True, exist_ok=True)
            out = self.log_path.open("a")
        try:
            self.popen = subprocess.Popen(  # noqa: S603 (our own interpreter and manage.py)
                self.command, cwd=ROOT, env=self.env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
            )
        finally:
            if not isinstance(out, int):
                out.close()  # the child has its own copy
        return self

    @property
    def pid(self) -> int:
        if self.popen is None:
            raise RuntimeError(f"{self.name} was not started")
        return self.popen.pid

    def running(self) -> bool:
        return self.popen is not None and self.popen.poll() is None

    def log(self) -> str:
        return self.log_path.read_text() if self.log_path and self.log_path.exists() else ""

    def check_alive(self) -> None:
        if self.popen is not None and self.popen.poll() is not None:
            raise AssertionError(f"{self.name} exited with {self.popen.returncode}; see {self.log_path}")

    def wait_until(self, ready: Callable[[], bool], *, timeout: float = 60, message: str = "") -> None:
        """Wait for `ready`, failing at once if the process exits meanwhile."""

        def check() -> bool:
            self.check_alive()
            return ready()

        wait_for(check, timeout=timeout, interval=0.2, message=message or f"{self.name} (log: {self.log_path})")

    def wait_for_log(self, marker: str, *, count: int = 1, timeout: float = 60) -> None:
        """Wait until `marker` appears `count` times in the log (a worker prints " ready.")."""
        self.wait_until(lambda: self.log().count(marker) >= count, timeout=timeout, message=f"{self.name}: {marker!r}")

    def send(self, sig: int) -> None:
        """Send `sig` to the process and everything it started (a prefork worker's children)."""
        if self.running():
            os.killpg(self.pid, sig)

    def stop(self, *, timeout: float = 20, sig: int = signal.SIGTERM) -> None:
        """Ask it to stop (`sig`), and kill it if it has not after `timeout` seconds."""
        self.send(sig)
        self.wait_or_kill(timeout=timeout)

    def wait_or_kill(self, *, timeout: float = 20) -> None:
        """Wait for it to exit (after a signal sent with `send`), and kill it after `timeout`."""
        if self.popen is None:
            return
        try:
            self.popen.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.send(signal.SIGKILL)
            self.popen.wait()
