"""CPU time of `make bench`'s processes in totals per component, read from `/proc` (Linux): the
figure that stays usable on a shared, loaded machine, where throughput and latency are not.
(`loadtest/cpu.py` keeps per-process readings instead, for the observability benchmark, which
takes its own polling backend out; both read the same `/proc` fields.)

    before = cpu_totals.snapshot(workers=[worker.pid])
    ...  # the run
    spent = cpu_totals.delta(before, cpu_totals.snapshot(workers=[worker.pid]))  # CPU s per component

Components (utime + stime, in seconds):

- `workers`: the given worker pids and every process below them (a prefork pool's children),
  plus what their exited, reaped children spent (`cutime + cstime`);
- `postgres`: every process whose comm is `postgres` (backends, walwriter, checkpointer...), plus
  the postmaster's reaped children: a backend that exits mid-run is still counted. On a shared
  machine this includes other people's backends;
- `postgres_own`: only the backends of the databases named in `databases` (the process title
  names its database): a backend that exits between the two snapshots is lost here;
- `redis`: every `redis-server` process (shared, too);
- `client`: this process (all its threads), not its children (the workers are counted above).

`total` is workers + postgres + redis + client; `total_own` uses `postgres_own` instead.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

PROC = Path("/proc")
TICKS = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
COMPONENTS = ("workers", "postgres", "postgres_own", "redis", "client")


def _stat(pid: int) -> tuple[str, int, float, float] | None:
    """(comm, ppid, own CPU seconds, reaped children's CPU seconds), or None if it is gone."""
    try:
        raw = (PROC / str(pid) / "stat").read_text()
    except OSError:
        return None
    # The comm is in parentheses and may hold spaces or parentheses: split after the last one.
    comm = raw[raw.index("(") + 1 : raw.rindex(")")]
    fields = raw[raw.rindex(")") + 2 :].split()
    # fields[0] is field 3 (state): utime is field 14, stime 15, cutime 16, cstime 17.
    ppid = int(fields[1])
    own = (int(fields[11]) + int(fields[12])) / TICKS
    children = (int(fields[13]) + int(fields[14])) / TICKS
    return comm, ppid, own, children


def _cmdline(pid: int) -> str:
    try:
        return (PROC / str(pid) / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def processes() -> dict[int, tuple[str, int, float, float]]:
    found = {}
    for entry in PROC.iterdir():
        if entry.name.isdigit() and (stat := _stat(int(entry.name))) is not None:
            found[int(entry.name)] = stat
    return found


def available() -> bool:
    return (PROC / "self" / "stat").exists()


def snapshot(*, workers: Iterable[int] = (), databases: Iterable[str] = ()) -> dict:
    """CPU seconds so far per component, and per own PostgreSQL backend (`own_backends`)."""
    if not available():
        return dict.fromkeys(COMPONENTS, 0.0) | {"own_backends": {}}
    table = processes()
    children: dict[int, list[int]] = {}
    for pid, (_, ppid, _, _) in table.items():
        children.setdefault(ppid, []).append(pid)
    worker_cpu = 0.0
    stack = [pid for pid in workers if pid in table]
    seen: set[int] = set()
    while stack:
        pid = stack.pop()
        if pid in seen:
            continue
        seen.add(pid)
        _, _, own, reaped = table[pid]
        worker_cpu += own + reaped
        stack.extend(children.get(pid, ()))
    postgres = postgres_own = redis = 0.0
    own_backends: dict[int, float] = {}
    names = {f" {name} " for name in databases}
    for pid, (comm, ppid, own, reaped) in table.items():
        if comm == "postgres":
            # The postmaster (its parent is not postgres) also carries its reaped backends.
            parent = table.get(ppid)
            postgres += own + (reaped if parent is None or parent[0] != "postgres" else 0.0)
            if names and any(name in f" {_cmdline(pid)} " for name in names):
                own_backends[pid] = own
                postgres_own += own
        elif comm == "redis-server":
            redis += own + reaped
    me = _stat(os.getpid())
    return {
        "workers": worker_cpu,
        "postgres": postgres,
        "postgres_own": postgres_own,
        "redis": redis,
        "client": me[2] if me else 0.0,
        "own_backends": own_backends,
    }


def delta(a: dict, b: dict) -> dict[str, float]:
    """CPU seconds spent per component between snapshots `a` and `b`, with `total` and
    `total_own`. An own backend seen only in `b` counts whole (it started during the run)."""
    spent = {name: max(0.0, b[name] - a[name]) for name in COMPONENTS if name != "postgres_own"}
    before = a.get("own_backends", {})
    spent["postgres_own"] = sum(max(0.0, cpu - before.get(pid, 0.0)) for pid, cpu in b.get("own_backends", {}).items())
    spent["total"] = spent["workers"] + spent["postgres"] + spent["redis"] + spent["client"]
    spent["total_own"] = spent["workers"] + spent["postgres_own"] + spent["redis"] + spent["client"]
    return spent


def per_order_ms(spent: dict[str, float], orders: int) -> dict[str, float]:
    """CPU-ms per order for each component of a `delta`."""
    return {name: round(1000 * seconds / max(1, orders), 2) for name, seconds in spent.items()}
