"""The dashboard's overview figures, read from the orchestrator's database (and the broker).

Everything is computed from stored facts, so any dashboard, reconnecting or new, sees the same
numbers: per-minute counts from the saga-level events, latency from sagas' start and finish
times, message traffic between services from the step events. Times are the database's.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from datetime import timedelta
from types import SimpleNamespace

from django.db.models import Count
from django.db.models.functions import TruncMinute

from sagaplatform import workers
from sagaplatform.kernel import breakers, ports, registry
from sagaplatform.kernel.clock import db_now

from . import alerting, rules
from .definitions import DEFINITIONS, for_saga
from .engine import style
from .models import Alert, Saga, SagaEvent, SagaStep

logger = logging.getLogger(__name__)

DB = "default"
MINUTES = 15
LATENCY_WINDOW = timedelta(minutes=5)
FLOW_WINDOW = timedelta(minutes=5)
ORCHESTRATOR = "orchestrator"

# Saga-level transitions counted per minute, by the event that records them. Not by the state
# an event leaves the saga in: the tracker records every observed event at saga level (with the
# saga's current state), and an operator retry puts a parked saga back to running.
COUNTED = {
    "saga_completed": "completed",
    "saga_compensated": "compensated",
    "saga_failed": "failed",
    "saga_cancelled": "cancelled",
    "saga_parked": "parked",
}
SERIES = ("started", *COUNTED.values())
# A message out (a step in flight, not one waiting out a backoff: that counts as a failure).
STEP_OUT = rules.STEP_IN_FLIGHT - {SagaStep.State.RETRYING}
STEP_OK = {SagaStep.State.SUCCEEDED, SagaStep.State.COMPENSATED, SagaStep.State.CONFIRMED, SagaStep.State.SKIPPED}
STEP_BAD = {
    SagaStep.State.RETRYING,
    SagaStep.State.FAILED,
    SagaStep.State.COMPENSATION_FAILED,
    SagaStep.State.CONFIRM_FAILED,
}


def _version(name: str, digest: str):
    """The definition version a saga ran (its step graph), or None if it cannot be loaded."""
    try:
        return for_saga(SimpleNamespace(definition=name, definition_hash=digest))
    except LookupError:
        return None


def percentile(sorted_values: list[float], p: float) -> float | None:
    if not sorted_values:
        return None
    index = min(len(sorted_values) - 1, max(0, round(p / 100 * len(sorted_values) + 0.5) - 1))
    return sorted_values[index]


def minutes(now) -> list[dict]:
    start = (now - timedelta(minutes=MINUTES - 1)).replace(second=0, microsecond=0)
    buckets = {start + timedelta(minutes=i): dict.fromkeys(SERIES, 0) for i in range(MINUTES)}
    events = SagaEvent.objects.using(DB).filter(step="", created_at__gte=start)
    # A saga's first event (seq 1) is written in the transaction that creates it, by the engine
    # or by the choreography's tracker: one start per saga, whatever its style.
    started = events.filter(seq=1).annotate(minute=TruncMinute("created_at")).values("minute").annotate(n=Count("id"))
    ended = (
        events.filter(kind__in=list(COUNTED))
        .annotate(minute=TruncMinute("created_at"))
        .values("minute", "kind")
        .annotate(n=Count("id"))
    )
    for row in started:
        if (bucket := buckets.get(row["minute"])) is not None:
            bucket["started"] += row["n"]
    for row in ended:
        if (bucket := buckets.get(row["minute"])) is not None:
            bucket[COUNTED[row["kind"]]] += row["n"]
    return [{"t": t.isoformat(), **counts} for t, counts in buckets.items()]


def latency(now) -> dict:
    rows = (
        Saga.objects.using(DB)
        # Matches the partial index saga_finished_unpurged (a saga that finished minutes ago
        # has its whole history).
        .filter(finished_at__gte=now - LATENCY_WINDOW, history_purged_at__isnull=True)
        .values_list("created_at", "finished_at")
        .order_by()[:20000]
    )
    values = sorted((finished - created).total_seconds() * 1000 for created, finished in rows)
    return {
        "count": len(values),
        **{f"p{p}": (round(v) if (v := percentile(values, p)) is not None else None) for p in (50, 95, 99)},
    }


def flow(now) -> dict:
    """Messages between the orchestrator and the services (or, in a choreography, between the
    services themselves) over the last minutes, from the steps' transitions."""
    rows = (
        SagaEvent.objects.using(DB)
        .filter(created_at__gte=now - FLOW_WINDOW)
        .exclude(step="")
        .values("saga__definition", "saga__definition_hash", "step", "to_state")
        .annotate(n=Count("id"))
        .order_by()
    )
    per_min = FLOW_WINDOW.total_seconds() / 60
    edges: dict[tuple[str, str, str], dict] = defaultdict(lambda: {"count": 0, "failures": 0})
    for row in rows:
        definition = _version(row["saga__definition"], row["saga__definition_hash"])
        if definition is None or not definition.has_step(row["step"]):
            continue
        spec = definition.step(row["step"])
        state, n = row["to_state"], row["n"]
        if not style.of(definition).coordinated:
            # Each service reacts to the events of the steps it follows; the first to the order.
            sources = [definition.step(d).service for d in spec.depends_on] or ["orders"]
            if state in STEP_OUT or state in STEP_BAD:
                for source in sources:
                    edge = edges[(source, spec.service, "event")]
                    edge["count"] += n if state in STEP_OUT else 0
                    edge["failures"] += n if state in STEP_BAD else 0
            continue
        if state in STEP_OUT:
            edges[(ORCHESTRATOR, spec.service, "command")]["count"] += n
        elif state in STEP_OK or state in STEP_BAD:
            edge = edges[(spec.service, ORCHESTRATOR, "reply")]
            edge["count"] += n
            edge["failures"] += n if state in STEP_BAD else 0
    services = sorted({s.service for d in DEFINITIONS.values() for s in (*d.steps, *d.on_failure)})
    return {
        "nodes": [ORCHESTRATOR, *services],
        "edges": [
            {
                "source": source,
                "target": target,
                "kind": kind,
                "per_min": round(e["count"] / per_min, 2),
                "failures_per_min": round(e["failures"] / per_min, 2),
            }
            for (source, target, kind), e in sorted(edges.items())
        ],
    }


def services_of() -> list[str]:
    return sorted({s.service for d in DEFINITIONS.values() for s in (*d.steps, *d.on_failure)})


def overview() -> dict:
    now = db_now(DB)
    by_state = dict(
        Saga.objects.using(DB)
        # The states not ended, named (an index scan of the few), not "not ended" (a scan of all).
        .filter(state__in=[s for s in Saga.State.values if s not in rules.SAGA_TERMINAL])
        .values_list("state")
        .annotate(n=Count("id"))
        .order_by()
    )
    lat = latency(now)
    instances = registry_instances()
    return {
        "now": now.isoformat(),
        "minutes": minutes(now),
        "in_flight": sum(by_state.values()),
        "by_state": by_state,
        "throughput_per_min": round(lat["count"] / (LATENCY_WINDOW.total_seconds() / 60), 2),
        "latency_ms": lat,
        "queues": workers.queue_depths(),
        "workers": workers_of(instances),
        # The service registry: every instance, live or recently expired (heartbeat and oldest
        # running task ages in seconds, the code and definition versions it runs).
        "instances": instances,
        "flow": flow(now),
        "dead_letters": dead_letters(),
        "alerting": alerting.recent(),
        "contention": ports.stock_contention(),
        # Each service's circuit breaker, and the payment gateway's (closed, open, half_open).
        "breakers": breakers.states([*services_of(), breakers.GATEWAY]),
    }


def registry_instances() -> list[dict]:
    try:
        return registry.snapshot_view()["instances"]
    except Exception:  # the registry's store is down: the panel says "no live worker"
        logger.warning("service registry not readable", exc_info=True)
        return []


def workers_of(instances: list[dict]) -> list[dict]:
    """One entry per worker (the queues panel and the flow graph): its queues, alive or not."""
    by_worker: dict[str, dict] = {}
    for i in instances:
        w = by_worker.setdefault(
            i["worker"], {"name": i["worker"], "queues": [], "seen_at": i["heartbeat_at"], "alive": False}
        )
        w["queues"] = sorted({*w["queues"], *i["queues"]})
        w["alive"] = w["alive"] or i["alive"]
    return sorted(by_worker.values(), key=lambda w: w["name"])


def dead_letters() -> dict:
    """Open alerts for messages a worker dead-lettered (the rows themselves are in the admin)."""
    open_alerts = Alert.objects.using(DB).filter(kind=Alert.Kind.DEAD_LETTER, resolved_at__isnull=True)
    latest = open_alerts.order_by("-created_at").values("message", "created_at")[:3]
    return {
        "open": open_alerts.count(),
        "latest": [{"message": a["message"], "created_at": a["created_at"].isoformat()} for a in latest],
    }
