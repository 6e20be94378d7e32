"""The cost of observability: the saga benchmark with metrics and tracing on (the `null`
exporter: every span made, then dropped) and off, in alternating rounds of one run
(`make bench BENCH_ARGS="--observability"`). Prints the slowdown of throughput and latency."""

from __future__ import annotations

import json
import statistics
from typing import Any

from loadtest import bench

MODES = {
    "off": {"SAGA_METRICS": "off", "OTEL_TRACES_EXPORTER": "none"},
    "on": {"SAGA_METRICS": "on", "OTEL_TRACES_EXPORTER": "null"},
}


def _set_in_process(mode: str) -> None:
    """This process places the orders (and so writes their first outbox rows): same switches."""
    from sagaplatform.observability import metrics, tracing

    metrics.ENABLED = mode == "on"
    if mode == "on":
        tracing.configure(exporter="null")
    else:
        tracing.ENABLED = False  # the instrumentations stay, with nothing current to follow


def run_observability_benchmark(*, n: int, concurrency: int, worker_concurrency: int, warmup: int, rounds: int, out):
    from django.conf import settings

    if settings.EMBEDDED_DATABASES or settings.EMBEDDED_BROKER:
        raise RuntimeError("the benchmark measures the production stack: set DATABASE_URL and REDIS_URL")
    bench._seed((n + warmup) * 2 * rounds)
    log_path = bench.ROOT / "var" / "bench-worker.log"
    log_path.parent.mkdir(exist_ok=True)
    out.write(
        f"{n} orders per round, {rounds} rounds of off/on, {concurrency} clients, worker -c {worker_concurrency}\n"
    )
    figures: dict[str, list[dict]] = {"off": [], "on": []}
    for round_ in range(rounds):
        for mode in ("off", "on"):
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
                run = bench.Run(f"round {round_ + 1} {mode}")
                bench.drive(
                    run,
                    n=n,
                    concurrency=concurrency,
                    place=bench._place_saga_order,
                    finished_ids=bench._finished_sagas,
                    out=out,
                )
                figures[mode].append(run.figures())
            finally:
                worker.stop(timeout=30)
    _set_in_process("off")

    def median(mode: str, key: str) -> float:
        return statistics.median(f[key] for f in figures[mode])

    summary: dict[str, Any] = {
        "orders": n,
        "rounds": rounds,
        "concurrency": concurrency,
        "worker_concurrency": worker_concurrency,
    }
    for mode in ("off", "on"):
        summary[mode] = {key: median(mode, key) for key in ("throughput_per_s", "p50_ms", "p95_ms", "p99_ms")}
    slowdown = 1 - summary["on"]["throughput_per_s"] / summary["off"]["throughput_per_s"]
    p50 = summary["on"]["p50_ms"] / summary["off"]["p50_ms"] - 1
    summary["throughput_slowdown_pct"] = round(100 * slowdown, 1)
    summary["p50_increase_pct"] = round(100 * p50, 1)
    out.write(
        f"off : {summary['off']['throughput_per_s']} orders/s  p50 {summary['off']['p50_ms']} ms  "
        f"p95 {summary['off']['p95_ms']} ms\n"
        f"on  : {summary['on']['throughput_per_s']} orders/s  p50 {summary['on']['p50_ms']} ms  "
        f"p95 {summary['on']['p95_ms']} ms\n"
        f"slowdown with metrics + tracing: throughput {summary['throughput_slowdown_pct']}%  "
        f"p50 {summary['p50_increase_pct']:+}%\n"
    )
    out.write(json.dumps(summary) + "\n")
    return summary
