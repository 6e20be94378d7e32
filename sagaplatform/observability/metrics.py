"""Prometheus metrics, correct across processes (the web process, every Celery pool child, beat).

The client runs in multiprocess mode: each process writes its samples to files under
PROMETHEUS_MULTIPROC_DIR (set by `prepare_environment()`), and `/metrics` (views.py) merges them
at scrape time, together with gauges read from the databases then (collectors.py).

Labels are bounded: definition, style, step, service, kind, outcome, queue, database. Never a
saga, order, SKU or customer id.

Saga and step figures come from the engine's timeline (`saga_event`, called for every event the
engine records), counted once the engine's transaction commits, so they agree with the
dashboard. The service side (queue wait, handler time, barrier hits, lock conflicts) is counted
where it happens, in the kernel.
"""

from __future__ import annotations

import os
import time
from datetime import datetime

from django.db import transaction
from prometheus_client import Counter, Gauge, Histogram

PREFIX = "sagaplatform"
# On unless SAGA_METRICS=off (the benchmark's baseline): then no hook counts anything.
ENABLED = os.environ.get("SAGA_METRICS", "on").lower() != "off"

SAGAS_STARTED = Counter(f"{PREFIX}_sagas_started", "Sagas started", ["definition", "style"])
SAGAS_FINISHED = Counter(
    f"{PREFIX}_sagas_finished",
    "Sagas that ended: completed, compensated, cancelled or failed",
    ["definition", "style", "outcome"],
)
SAGAS_PARKED = Counter(f"{PREFIX}_sagas_parked", "Sagas parked for an operator", ["definition", "style"])
SAGA_DURATION = Histogram(
    f"{PREFIX}_saga_duration_seconds",
    "From a saga's creation to its end",
    ["definition", "style", "outcome"],
    buckets=(0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 30, 60, 120, 300, 600, 1200, 1800, float("inf")),
)
STEP_ATTEMPTS = Counter(
    f"{PREFIX}_step_attempts",
    "Step attempts answered (or timed out), by outcome",
    ["service", "step", "kind", "outcome"],
)
STEP_FINAL_FAILURES = Counter(
    f"{PREFIX}_step_final_failures",
    "Steps that failed for good after their retries ran out",
    ["service", "step", "kind"],
)
STEP_ATTEMPTS_PER_EXECUTION = Histogram(
    f"{PREFIX}_step_attempts_per_execution",
    "Attempts a step execution took until it ended",
    ["service", "step", "kind"],
    buckets=(1, 2, 3, 4, 5, 7, 10, 15, 20, float("inf")),
)
CANCELLATIONS = Counter(f"{PREFIX}_cancellations", "Cancellations accepted", ["definition", "style"])
OPERATOR_ACTIONS = Counter(f"{PREFIX}_operator_actions", "Operator actions on sagas", ["action"])

QUEUE_WAIT = Histogram(
    f"{PREFIX}_queue_wait_seconds",
    "From a message's outbox commit (or due time, when delayed) to its handler's start",
    ["queue"],
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, float("inf")),
)
HANDLER_DURATION = Histogram(
    f"{PREFIX}_step_handler_duration_seconds",
    "Time a service took to run one step command (barrier, operation, reply)",
    ["service", "step", "kind"],
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, float("inf")),
)
BARRIER_HITS = Counter(
    f"{PREFIX}_barrier_hits",
    "Messages the barrier answered without running the operation",
    ["service", "kind"],  # duplicate, null_compensation, hanging_refused, action_answered
)
LOCK_CONFLICTS = Counter(f"{PREFIX}_optimistic_lock_conflicts", "Optimistic-lock version conflicts", ["service"])
LOCK_RETRIES = Counter(
    f"{PREFIX}_optimistic_lock_retries", "Optimistic-lock conflicts that were retried (read again)", ["service"]
)
LOCK_EXHAUSTED = Counter(
    f"{PREFIX}_optimistic_lock_exhausted",
    "Reservations of a stock line that ran out of lock attempts (INVENTORY_MAX_LOCK_ATTEMPTS)",
    ["service"],
)
STEP_DEFERRALS = Counter(
    f"{PREFIX}_step_deferrals",
    "Steps (and choreographed reactions) that waited for a circuit breaker instead of running or retrying",
    ["service", "step", "breaker"],
)
ALERT_DELIVERY_ATTEMPTS = Counter(
    f"{PREFIX}_alert_delivery_attempts",
    "Alert delivery attempts, per channel: ok, or error (retried later or given up)",
    ["channel", "outcome"],
)
ALERT_DELIVERIES = Counter(
    f"{PREFIX}_alert_deliveries",
    "Alert deliveries that ended, per channel: delivered, or failed after the last attempt",
    ["channel", "outcome"],
)
TASKS_IN_PROGRESS = Gauge(
    f"{PREFIX}_tasks_in_progress",
    "Celery tasks running now, per queue",
    ["queue"],
    multiprocess_mode="livesum",  # a dead child's share disappears with it
)

# Event kind -> (attempt kind, attempt outcome or None, ends the execution, final failure)
_SUCCEEDED = "succeeded"
_KINDS = {
    "step_succeeded": ("action", _SUCCEEDED, True),
    "retry_scheduled": ("action", None, False),
    "step_failed": ("action", None, True),
    "step_compensated": ("compensation", _SUCCEEDED, True),
    "compensation_retry_scheduled": ("compensation", None, False),
    "compensation_failed": ("compensation", None, True),
    "step_confirmed": ("confirm", _SUCCEEDED, True),
    "confirm_retry_scheduled": ("confirm", None, False),
    "confirm_failed": ("confirm", None, True),
}
_FINISHED = {
    "saga_completed": "completed",
    "saga_compensated": "compensated",
    "saga_cancelled": "cancelled",
    "saga_failed": "failed",
}
_OPERATOR = {"operator_retry": "retry", "compensation_skipped": "skip"}


def _error_outcome(data: dict) -> str:
    error = data.get("error") or {}
    return "timeout" if error.get("code") == "step_timeout" else "transient_error"


def _figures(run, event, step) -> list[tuple]:
    """What one timeline event adds: (metric, labels, value, is_histogram)."""
    kind = event.kind
    definition, style = run.definition.name, run.definition.style
    data = event.data or {}
    out: list[tuple] = []
    outcome: str | None
    if event.seq == 1:
        # A saga's first event, whoever writes it (the engine's saga_created, or whatever event
        # the choreography's tracker heard of first): one start per saga, as on the dashboard.
        out.append((SAGAS_STARTED, (definition, style), 1, False))
    if kind in _FINISHED:
        outcome = _FINISHED[kind]
        out.append((SAGAS_FINISHED, (definition, style, outcome), 1, False))
        created = run.saga.created_at
        if isinstance(created, datetime) and isinstance(run.now, datetime):
            duration = max(0.0, (run.now - created).total_seconds())
            out.append((SAGA_DURATION, (definition, style, outcome), duration, True))
    elif kind == "saga_parked":
        out.append((SAGAS_PARKED, (definition, style), 1, False))
    elif kind == "saga_cancel_requested":
        out.append((CANCELLATIONS, (definition, style), 1, False))
    elif kind in _OPERATOR:
        out.append((OPERATOR_ACTIONS, (_OPERATOR[kind],), 1, False))
    elif kind == "step_deferred" and step is not None:
        out.append((STEP_DEFERRALS, (step.service, step.name, str(data.get("breaker") or step.service)), 1, False))
    elif kind in _KINDS and step is not None:
        attempt_kind, outcome, ends = _KINDS[kind]
        service, name = step.service, step.name
        reason = data.get("reason")
        if reason == "abandoned":
            return out  # given up because the saga unwinds, not an attempt's outcome
        if outcome is None:
            outcome = "business_failure" if kind == "step_failed" and not reason else _error_outcome(data)
        out.append((STEP_ATTEMPTS, (service, name, attempt_kind, outcome), 1, False))
        if ends and outcome not in (_SUCCEEDED, "business_failure"):
            out.append((STEP_FINAL_FAILURES, (service, name, attempt_kind), 1, False))
        if ends and isinstance(data.get("attempt"), int):
            out.append((STEP_ATTEMPTS_PER_EXECUTION, (service, name, attempt_kind), data["attempt"], True))
    return out


# Labelled children, looked up once: `metric.labels(...)` takes a lock and converts every label
# to a string on each call. Bounded like the labels themselves; the same objects the metric
# keeps (a forked pool child's values move to its own files on their first update).
_CHILDREN: dict[tuple, object] = {}


def child(metric, *labels):
    """`metric.labels(*labels)`, cached."""
    key = (metric, labels)
    found = _CHILDREN.get(key)
    if found is None:
        found = _CHILDREN[key] = metric.labels(*labels)
    return found


def _apply(figures: list[tuple]) -> None:
    for metric, labels, value, histogram in figures:
        found = child(metric, *labels)
        if histogram:
            found.observe(value)
        else:
            found.inc(value)


def saga_event(run, event, step=None) -> None:
    """Count one event the engine records, once its transaction commits (a rolled-back
    transaction counts nothing). Also stamps the trace id on the saga's first event (seq 1)."""
    if event.seq == 1 and tracing_enabled():
        from . import tracing

        trace_id = tracing.current_trace_id()
        if trace_id:
            event.data = {**(event.data or {}), "trace_id": trace_id}
    if not ENABLED:
        return
    figures = _figures(run, event, step)
    if not figures:
        return
    pending = run.metrics_pending
    if pending is None:
        pending = []
        run.metrics_pending = pending
        transaction.on_commit(lambda: _apply(pending), using="default")
    pending.extend(figures)


# --- Service side ---------------------------------------------------------------------------


def tracing_enabled() -> bool:
    from . import tracing

    return tracing.ENABLED


def queue_wait(queue: str, enqueued_at) -> None:
    if not ENABLED:
        return
    try:
        waited = time.time() - float(enqueued_at)
    except (TypeError, ValueError):
        return
    child(QUEUE_WAIT, queue).observe(max(0.0, waited))


def handler_done(service: str, step: str, op: str, started: float) -> None:
    if ENABLED:
        child(HANDLER_DURATION, service, step, _OP_KIND.get(op, op)).observe(time.perf_counter() - started)


_OP_KIND = {"action": "action", "compensate": "compensation", "confirm": "confirm"}


def barrier_hit(service: str, kind: str) -> None:
    if ENABLED:
        child(BARRIER_HITS, service, kind).inc()


def lock_conflict(service: str, *, retried: bool = True) -> None:
    if ENABLED:
        child(LOCK_CONFLICTS, service).inc()
        if retried:
            child(LOCK_RETRIES, service).inc()


def lock_exhausted(service: str) -> None:
    if ENABLED:
        child(LOCK_EXHAUSTED, service).inc()


def alert_delivery(channel: str, *, ok: bool, final: bool) -> None:
    """One delivery attempt to `channel`, once its transaction commits; `final`: the delivery
    ended with it (delivered, or failed for good)."""
    if not ENABLED:
        return

    def count() -> None:
        ALERT_DELIVERY_ATTEMPTS.labels(channel, "ok" if ok else "error").inc()
        if final:
            ALERT_DELIVERIES.labels(channel, "delivered" if ok else "failed").inc()

    transaction.on_commit(count, using="default")


# --- Processes ------------------------------------------------------------------------------


def directory() -> str:
    return os.environ["PROMETHEUS_MULTIPROC_DIR"]


def remove_stale_files() -> int:
    """Remove the live-gauge files of processes that are gone (a previous run, a killed child).
    Counter and histogram files are kept: they hold counts that must not go down."""
    from prometheus_client import multiprocess

    removed = 0
    for name in os.listdir(directory()):
        if not name.endswith(".db") or "_live" not in name:
            continue
        try:
            pid = int(name.rsplit("_", 1)[1][:-3])
        except ValueError:
            continue
        if not _alive(pid):
            multiprocess.mark_process_dead(pid, directory())
            removed += 1
    return removed


def process_exited(pid: int) -> None:
    """A pool child exited: its live gauges go with it."""
    from prometheus_client import multiprocess

    multiprocess.mark_process_dead(pid, directory())


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
