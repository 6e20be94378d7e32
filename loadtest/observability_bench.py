"""The cost of observability: the saga benchmark with metrics and tracing on (the `null`
exporter: every span made, then dropped) and off, in rounds of one run that alternate which mode
runs first (`make bench BENCH_ARGS="--observability"`). Prints the slowdown of throughput and
latency, overall and each round's own, and
the CPU time per order of each mode (`loadtest/cpu.py`): the worker and its pool children, the
PostgreSQL backends of the benchmark's databases, Redis and this process. Throughput moves with
whatever else the host runs; CPU time per order much less.

The benchmark's own bookkeeping is taken out of the CPU figures: `bench.drive`'s monitor thread
polls the database every 10 ms for finished sagas, so its cost (in this process and in its
PostgreSQL backend) grows with the round's length, not with the orders, and a slower round would
look costlier per order; so does the sampler's reading of /proc. Both are measured (the thread's
own CPU time, the backend by its pid) and printed apart as `bench_overhead`."""

from __future__ import annotations

import json
import statistics
import threading
import time
from typing import Any

from loadtest import bench, cpu

IDLE_SECONDS = 3
ORDER = (("off", "on"), ("on", "off"))
MODES = {
    "off": {"SAGA_METRICS": "off", "OTEL_TRACES_EXPORTER": "none"},
    "on": {"SAGA_METRICS": "on", "OTEL_TRACES_EXPORTER": "null"},
    # One of the two alone (`observability_profile --modes off,metrics,traces`): what each costs.
    "metrics": {"SAGA_METRICS": "on", "OTEL_TRACES_EXPORTER": "none"},
    "traces": {"SAGA_METRICS": "off", "OTEL_TRACES_EXPORTER": "null"},
}


class _Polling:
    """`bench._finished_sagas`, as drive's monitor thread calls it, with the CPU time that thread
    spends in it and the PostgreSQL backend it uses."""

    def __init__(self) -> None:
        self.seconds = 0.0
        self.backends: set[int] = set()
        self.lock = threading.Lock()

    def __call__(self, ids: list[str]) -> list[str]:
        from django.db import connections

        started = time.thread_time()
        try:
            return bench._finished_sagas(ids)
        finally:
            used = time.thread_time() - started
            connection = connections["default"].connection
            with self.lock:
                self.seconds += used
                if connection is not None:
                    self.backends.add(connection.info.backend_pid)


def _cpu_per_order(before, after, *, polling: _Polling, sampler: cpu.Sampler, n: int) -> dict[str, float]:
    """CPU ms per order of each component, the benchmark's own polling and sampling taken out
    (and shown as `bench_overhead`)."""
    raw = cpu.delta(before, after)
    used = cpu.delta(before, after, exclude=polling.backends)
    overhead = (raw["postgres"] - used["postgres"]) + polling.seconds + sampler.own_seconds
    used["client"] = max(0.0, used["client"] - polling.seconds - sampler.own_seconds)
    used["total"] = sum(used[c] for c in cpu.COMPONENTS)
    used["bench_overhead"] = overhead
    return {key: round(1000 * value / n, 1) for key, value in used.items()}


def _set_in_process(mode: str) -> None:
    """This process places the orders (and so writes their first outbox rows): same switches."""
    from sagaplatform.observability import metrics, tracing

    metrics.ENABLED = mode in ("on", "metrics")
    if mode in ("on", "traces"):
        tracing.configure(exporter="null")
    else:
        tracing.ENABLED = False  # the instrumentations stay, with nothing current to follow


def run_observability_benchmark(*, n: int, concurrency: int, worker_concurrency: int, warmup: int, rounds: int, out):
    from django.conf import settings

    if settings.EMBEDDED_DATABASES or settings.EMBEDDED_BROKER:
        raise RuntimeError("the benchmark measures the production stack: set DATABASE_URL and REDIS_URL")
    bench._seed((n + warmup) * 2 * rounds)
    log_path = settings.VAR_DIR / "bench-worker.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    out.write(
        f"{n} orders per round, {rounds} rounds of off/on (on/off in even rounds), {concurrency} clients, "
        f"worker -c {worker_concurrency}\n"
    )
    figures: dict[str, list[dict]] = {"off": [], "on": []}
    cpu_ms: dict[str, list[dict]] = {"off": [], "on": []}
    databases = [settings.DATABASES[alias]["NAME"] for alias in settings.DATABASE_ALIASES]
    redis_pid = cpu.redis_server_pid(settings.REDIS_URL)
    for round_ in range(rounds):
        # Off first in odd rounds, on first in even ones (off-on, on-off, ...): the host's speed
        # drifts by several per cent over a run, and a fixed order charged that drift to one mode.
        for mode in ORDER[round_ % 2]:
            _set_in_process(mode)
            worker = bench.start_worker(worker_concurrency, log_path, extra_env=MODES[mode])
            try:
                if warmup:
                    bench.drive(
                        bench.Run(f"{mode} (warm-up)"),
                        n=warmup,
                        concurrency=min(concurrency, warmup),
                        place=bench._place_saga_order,
                        finished_ids=bench._finished_sagas,
                        out=out,
                    )
                # What the processes use with nothing to do (the worker's broker polling and
                # heartbeats, Redis's housekeeping): a part of each round's CPU that grows with its
                # length. Printed for judging the figures, not subtracted.
                idle_before = cpu.snapshot(workers=[worker.pid], databases=databases, redis_pid=redis_pid)
                idle_started = time.monotonic()
                time.sleep(IDLE_SECONDS)
                idle = cpu.delta(
                    idle_before, cpu.snapshot(workers=[worker.pid], databases=databases, redis_pid=redis_pid)
                )
                idle_rate = {
                    c: round(1000 * idle[c] / (time.monotonic() - idle_started), 1) for c in ("workers", "redis")
                }
                run = bench.Run(f"round {round_ + 1} {mode}")
                sampler = cpu.Sampler(workers=[worker.pid], databases=databases, redis_pid=redis_pid)
                polling = _Polling()
                before = sampler.start()
                try:
                    bench.drive(
                        run,
                        n=n,
                        concurrency=concurrency,
                        place=bench._place_saga_order,
                        finished_ids=polling,
                        out=out,
                    )
                finally:
                    after = sampler.stop()
                figures[mode].append(run.figures())
                per_order = _cpu_per_order(before, after, polling=polling, sampler=sampler, n=n)
                cpu_ms[mode].append(per_order)
                out.write(
                    f"  round {round_ + 1} {mode}: CPU ms per order {json.dumps(per_order)}; idle before it, "
                    f"CPU ms per second: {json.dumps(idle_rate)}\n"
                )
            finally:
                worker.stop(timeout=30)
    _set_in_process("off")

    def median(mode: str, key: str) -> float:
        return round(statistics.median(f[key] for f in figures[mode]), 1)

    summary: dict[str, Any] = {
        "orders": n,
        "rounds": rounds,
        "concurrency": concurrency,
        "worker_concurrency": worker_concurrency,
    }
    for mode in ("off", "on"):
        summary[mode] = {key: median(mode, key) for key in ("throughput_per_s", "p50_ms", "p95_ms", "p99_ms")}
        summary[mode]["cpu_ms_per_order"] = {
            key: round(statistics.median(f[key] for f in cpu_ms[mode]), 1)
            for key in (*cpu.COMPONENTS, "total", "bench_overhead")
        }
    # Each round's own comparison (its two halves ran back to back): the median of those, beside
    # the comparison of the medians.
    summary["per_round"] = [
        {
            "throughput_slowdown_pct": round(100 * (1 - on["throughput_per_s"] / off["throughput_per_s"]), 1),
            "cpu_increase_pct": round(100 * (on_cpu["total"] / off_cpu["total"] - 1), 1),
        }
        for off, on, off_cpu, on_cpu in zip(figures["off"], figures["on"], cpu_ms["off"], cpu_ms["on"], strict=True)
    ]
    slowdown = 1 - summary["on"]["throughput_per_s"] / summary["off"]["throughput_per_s"]
    p50 = summary["on"]["p50_ms"] / summary["off"]["p50_ms"] - 1
    summary["throughput_slowdown_pct"] = round(100 * slowdown, 1)
    summary["p50_increase_pct"] = round(100 * p50, 1)
    off_cpu, on_cpu = summary["off"]["cpu_ms_per_order"], summary["on"]["cpu_ms_per_order"]
    # Without Redis: its server is shared with whatever else uses it on this host.
    own = [c for c in cpu.COMPONENTS if c != "redis"]
    off_own, on_own = sum(off_cpu[c] for c in own), sum(on_cpu[c] for c in own)
    summary["cpu_increase_pct"] = round(100 * (on_cpu["total"] / off_cpu["total"] - 1), 1)
    summary["cpu_increase_pct_without_redis"] = round(100 * (on_own / off_own - 1), 1)
    out.write(
        f"off : {summary['off']['throughput_per_s']} orders/s  p50 {summary['off']['p50_ms']} ms  "
        f"p95 {summary['off']['p95_ms']} ms\n"
        f"on  : {summary['on']['throughput_per_s']} orders/s  p50 {summary['on']['p50_ms']} ms  "
        f"p95 {summary['on']['p95_ms']} ms\n"
        f"slowdown with metrics + tracing: throughput {summary['throughput_slowdown_pct']}%  "
        f"p50 {summary['p50_increase_pct']:+}%\n"
    )
    for mode, per_order in (("off", off_cpu), ("on", on_cpu)):
        parts = "  ".join(f"{c} {per_order[c]}" for c in cpu.COMPONENTS)
        out.write(
            f"CPU ms per order, {mode:3}: total {per_order['total']}  ({parts};  "
            f"not counted: bench polling and sampling {per_order['bench_overhead']})\n"
        )
    out.write(
        f"CPU per order with metrics + tracing: {summary['cpu_increase_pct']:+}% "
        f"({summary['cpu_increase_pct_without_redis']:+}% without Redis, shared on this host)\n"
    )
    paired = {
        key: round(statistics.median(r[key] for r in summary["per_round"]), 1)
        for key in ("throughput_slowdown_pct", "cpu_increase_pct")
    }
    summary["per_round_median"] = paired
    out.write(
        "each round on against off: throughput "
        + ", ".join(f"{r['throughput_slowdown_pct']}%" for r in summary["per_round"])
        + "; CPU "
        + ", ".join(f"{r['cpu_increase_pct']:+}%" for r in summary["per_round"])
        + f"; medians {paired['throughput_slowdown_pct']}% and {paired['cpu_increase_pct']:+}%\n"
    )
    out.write(json.dumps(summary) + "\n")
    return summary
