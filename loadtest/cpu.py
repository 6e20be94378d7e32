"""CPU time spent by the processes a benchmark drives, read from `/proc/<pid>/stat` (Linux).

CPU time (user + system, in seconds) is a steadier figure than throughput on a shared machine: the
other processes of the host slow a round down, but they do not add to the CPU its own processes
use. Components:

- `workers`: each root pid given (a Celery worker) and every live descendant (its pool children);
- `postgres`: the PostgreSQL backends connected to the given databases, found by their process
  title (`postgres: [cluster:] <user> <database> <client> <activity>`), so no query is needed;
- `redis`: the Redis server (its pid from `INFO server`). Shared with whoever else uses that
  server: a noisy figure on a shared host;
- `client`: this process (the benchmark places its orders from here).

Usage::

    before = cpu.snapshot(workers=[worker.pid], databases=names, redis_url=url)
    ... the round ...
    after = cpu.snapshot(workers=[worker.pid], databases=names, redis_url=url)
    cpu.delta(before, after)  # {"workers": 1.9, "postgres": 0.8, "redis": 0.1, "client": 0.4, "total": 3.2}

A process counts its own time plus that of its children it has reaped (`cutime`, `cstime`), so a
pool child recycled during the round still counts (the worker reaps it). A process that exits
during the round is lost, with whatever it used since the last snapshot: PostgreSQL backends end
when their client closes its connection, and the postmaster (shared by every database) reaps them.
`Sampler` takes a snapshot every `interval` seconds in a thread and keeps each process's last
reading, so such a backend loses at most one interval.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Iterable

COMPONENTS = ("workers", "postgres", "redis", "client")
_TICKS = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
_PROC = "/proc"

# One process: (start time in clock ticks since boot, CPU seconds). The start time tells a
# reused pid from the process that had it.
Reading = tuple[int, float]
Snapshot = dict[str, dict[int, Reading]]


def read(pid: int) -> Reading | None:
    """(start time, utime + stime + cutime + cstime in seconds) of `pid`, or None if it is gone."""
    try:
        with open(f"{_PROC}/{pid}/stat", "rb") as f:
            raw = f.read().decode()
    except OSError:
        return None
    # The command name (field 2) is in parentheses and may hold spaces: split after its end.
    fields = raw[raw.rindex(")") + 2 :].split()
    # fields[0] is field 3 (state): utime..cstime are fields 14-17, starttime field 22.
    utime, stime, cutime, cstime = (int(v) for v in fields[11:15])
    return int(fields[19]), (utime + stime + cutime + cstime) / _TICKS


def _pids() -> list[int]:
    return [int(name) for name in os.listdir(_PROC) if name.isdigit()]


def _parent(pid: int) -> int | None:
    try:
        with open(f"{_PROC}/{pid}/stat", "rb") as f:
            raw = f.read().decode()
    except OSError:
        return None
    return int(raw[raw.rindex(")") + 2 :].split()[1])


def descendants(roots: Iterable[int], *, all_pids: list[int] | None = None) -> set[int]:
    """`roots` and every live process under them."""
    roots = set(roots)
    if not roots:
        return set()
    children: dict[int, list[int]] = {}
    for pid in _pids() if all_pids is None else all_pids:
        parent = _parent(pid)
        if parent is not None:
            children.setdefault(parent, []).append(pid)
    found, todo = set(), list(roots)
    while todo:
        pid = todo.pop()
        if pid in found:
            continue
        found.add(pid)
        todo.extend(children.get(pid, ()))
    return found


def postgres_backends(databases: Iterable[str], *, all_pids: list[int] | None = None) -> set[int]:
    """Pids of the PostgreSQL backends connected to one of `databases` (readable by their
    process title on the same host; a server in a container or on another host shows nothing)."""
    names = set(databases)
    if not names:
        return set()
    found = set()
    for pid in _pids() if all_pids is None else all_pids:
        try:
            with open(f"{_PROC}/{pid}/cmdline", "rb") as f:
                title = f.read().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if title.startswith("postgres: ") and names.intersection(title.split()):
            found.add(pid)
    return found


def redis_server_pid(url: str) -> int | None:
    """The Redis server's pid (from `INFO server`), or None if it does not answer."""
    import redis

    try:
        client = redis.Redis.from_url(url, socket_timeout=2)
        try:
            return int(client.info("server")["process_id"])
        finally:
            client.close()
    except (redis.RedisError, OSError, KeyError, ValueError):
        return None


def snapshot(
    *,
    workers: Iterable[int] = (),
    databases: Iterable[str] = (),
    redis_url: str | None = None,
    redis_pid: int | None = None,
    client: bool = True,
) -> Snapshot:
    """The CPU readings of every process of each component, now: `{component: {pid: reading}}`.
    Pass `redis_pid` (from `redis_server_pid`) to save a round trip per snapshot."""
    all_pids = _pids()
    if redis_pid is None and redis_url:
        redis_pid = redis_server_pid(redis_url)
    pids = {
        "workers": descendants(workers, all_pids=all_pids),
        "postgres": postgres_backends(databases, all_pids=all_pids),
        "redis": {redis_pid} if redis_pid else set(),
        "client": {os.getpid()} if client else set(),
    }
    out: Snapshot = {}
    for component, members in pids.items():
        readings = {}
        for pid in members:
            reading = read(pid)
            if reading is not None:
                readings[pid] = reading
        out[component] = readings
    return out


def merge(older: Snapshot, newer: Snapshot) -> Snapshot:
    """`newer`, plus the processes only `older` saw (gone since, with their last reading)."""
    out: Snapshot = {}
    for component in set(older) | set(newer):
        readings = dict(older.get(component, {}))
        readings.update(newer.get(component, {}))
        out[component] = readings
    return out


def delta(before: Snapshot, after: Snapshot, *, exclude: Iterable[int] = ()) -> dict[str, float]:
    """CPU seconds each component used between two snapshots, and their `total`. A process in
    `after` only (started since, or a reused pid) counts from zero; one in `before` only (gone
    since) counts nothing more. Processes in `exclude` count nothing (say, the PostgreSQL backend
    of the benchmark's own polling)."""
    skip = set(exclude)
    out: dict[str, float] = {}
    for component in COMPONENTS:
        was = before.get(component, {})
        used = 0.0
        for pid, (started, seconds) in after.get(component, {}).items():
            if pid in skip:
                continue
            previous = was.get(pid)
            base = previous[1] if previous is not None and previous[0] == started else 0.0
            used += max(0.0, seconds - base)
        out[component] = round(used, 3)
    out["total"] = round(sum(out[c] for c in COMPONENTS), 3)
    return out


class Sampler:
    """Snapshots every `interval` seconds in a thread, merged: `stop()` returns the last reading
    of every process seen since `start()`, those that exited meanwhile included (they lose at most
    one interval). Takes the same arguments as `snapshot`. `own_seconds` is the CPU its thread
    used (part of the `client` component when this process is watched)."""

    def __init__(self, *, interval: float = 0.5, **sources) -> None:
        self.interval, self.sources = interval, sources
        self.own_seconds = 0.0
        self._merged: Snapshot = {}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> Snapshot:
        first = snapshot(**self.sources)
        self._merged = first
        self._thread = threading.Thread(target=self._run, name="cpu-sampler", daemon=True)
        self._thread.start()
        return first

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            started = time.thread_time()
            self._merged = merge(self._merged, snapshot(**self.sources))
            self.own_seconds += time.thread_time() - started

    def stop(self) -> Snapshot:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self._merged = merge(self._merged, snapshot(**self.sources))
        return self._merged
