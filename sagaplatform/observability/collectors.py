"""Gauges read from the databases and the broker at scrape time (the same in the embedded mode).

Each family is read on its own: a database or a broker that does not answer drops its families
from this scrape (and sets `sagaplatform_collector_up{source=...}` to 0), never the scrape."""

from __future__ import annotations

import logging

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

logger = logging.getLogger(__name__)
PREFIX = "sagaplatform"


class DatabaseCollector:
    def collect(self):
        up = GaugeMetricFamily(f"{PREFIX}_collector_up", "1 if the source answered this scrape", labels=["source"])
        for source, read in (
            ("sagas", self._sagas),
            ("outbox", self._outbox),
            ("broker", self._broker),
            ("registry", self._registry),
            ("breakers", self._breakers),
        ):
            try:
                families = list(read())
            except Exception:
                logger.warning("metrics: %s not readable", source, exc_info=True)
                up.add_metric([source], 0)
                continue
            up.add_metric([source], 1)
            yield from families
        yield up

    def describe(self):
        return []  # collected at scrape time only

    @staticmethod
    def _sagas():
        from django.db.models import Count, Min

        from orchestration.models import Alert, Saga
        from sagaplatform.kernel.clock import db_now

        now = db_now("default")
        # The states not ended, named: an index scan of the few, not a scan of every saga.
        live = Saga.objects.using("default").filter(
            state__in=[s for s in Saga.State.values if s not in Saga.TERMINAL_STATES]
        )
        in_flight = GaugeMetricFamily(
            f"{PREFIX}_sagas_in_flight", "Sagas not ended, by definition and state", labels=["definition", "state"]
        )
        for row in live.values("definition", "state").annotate(n=Count("id")).order_by():
            in_flight.add_metric([row["definition"], row["state"]], row["n"])
        oldest = GaugeMetricFamily(
            f"{PREFIX}_saga_oldest_in_flight_age_seconds",
            "Age of the oldest saga not ended, per state",
            labels=["state"],
        )
        for by_state in live.values("state").annotate(first=Min("created_at")).order_by():
            oldest.add_metric([by_state["state"]], max(0.0, (now - by_state["first"]).total_seconds()))
        overdue = GaugeMetricFamily(
            f"{PREFIX}_sagas_past_deadline", "Running sagas past their global deadline", labels=["definition"]
        )
        late = live.filter(state=Saga.State.RUNNING, deadline_at__lt=now).values("definition").annotate(n=Count("id"))
        for late_row in late.order_by():
            overdue.add_metric([late_row["definition"]], late_row["n"])
        alerts = GaugeMetricFamily(f"{PREFIX}_alerts_open", "Alerts not resolved, by kind", labels=["kind"])
        counts = dict.fromkeys(Alert.Kind.values, 0)
        open_alerts = (
            Alert.objects.using("default").filter(resolved_at__isnull=True).values("kind").annotate(n=Count("id"))
        )
        for by_kind in open_alerts.order_by():
            counts[by_kind["kind"]] = by_kind["n"]
        for kind, n in counts.items():
            alerts.add_metric([kind], n)
        return [in_flight, oldest, overdue, alerts]

    @staticmethod
    def _outbox():
        from django.conf import settings
        from django.db.models import Count, Min, Q

        from sagaplatform.kernel.clock import db_now
        from sagaplatform.kernel.models import OutboxMessage

        unpublished = GaugeMetricFamily(
            f"{PREFIX}_outbox_unpublished", "Outbox rows not yet published, per database", labels=["database"]
        )
        overdue = GaugeMetricFamily(
            f"{PREFIX}_outbox_oldest_due_age_seconds",
            "How long the oldest due, unpublished outbox row has waited (0 if none)",
            labels=["database"],
        )
        for alias in settings.DATABASE_ALIASES:
            now = db_now(alias)
            row = (
                OutboxMessage.objects.using(alias)
                .filter(published_at__isnull=True)
                .aggregate(n=Count("id"), first_due=Min("available_at", filter=Q(available_at__lte=now)))
            )
            unpublished.add_metric([alias], row["n"])
            first = row["first_due"]
            overdue.add_metric([alias], max(0.0, (now - first).total_seconds()) if first else 0.0)
        return [unpublished, overdue]

    @staticmethod
    def _broker():
        from sagaplatform import workers

        families = []
        depths = workers.queue_depths()
        if any(v is not None for v in depths.values()):
            depth = GaugeMetricFamily(f"{PREFIX}_queue_depth", "Messages waiting in a queue", labels=["queue"])
            for queue, n in depths.items():
                if n is not None:
                    depth.add_metric([queue], n)
            families.append(depth)
        return families

    @staticmethod
    def _registry():
        from django.conf import settings

        from sagaplatform.kernel import registry

        # The service registry: live instances per service and queue, and workers per queue.
        live = dict.fromkeys(settings.SAGA_QUEUES, 0)
        per_instance: dict[tuple[str, str], int] = {}
        for instance in registry.snapshot_view()["instances"]:
            if not instance["alive"]:
                continue
            for queue in instance["queues"]:
                live[queue] = live.get(queue, 0) + 1
                key = (instance["service"], queue)
                per_instance[key] = per_instance.get(key, 0) + 1
        alive = GaugeMetricFamily(f"{PREFIX}_live_workers", "Workers consuming a queue", labels=["queue"])
        for queue, n in live.items():
            alive.add_metric([queue], n)
        instances = GaugeMetricFamily(
            f"{PREFIX}_registry_live_instances", "Live service instances in the registry", labels=["service", "queue"]
        )
        for queue in settings.SAGA_QUEUES:
            per_instance.setdefault((registry.service_of(queue), queue), 0)
        for (service, queue), n in sorted(per_instance.items()):
            instances.add_metric([service, queue], n)
        return [alive, instances]

    @staticmethod
    def _breakers():
        """Each circuit breaker's state, window and transitions, from their shared store (Redis).
        Nothing while the breakers are off (BREAKER_ENABLED): none refuses anything then."""
        from django.conf import settings

        from sagaplatform.kernel import breakers

        if not breakers.enabled():
            return []
        names = sorted({*settings.SERVICE_ALIASES, breakers.GATEWAY, *breakers.names()})
        found = breakers.detail(names)
        state = GaugeMetricFamily(
            f"{PREFIX}_breaker_state",
            "1 for the state each circuit breaker is in (closed, open, half_open), 0 for the others",
            labels=["breaker", "state"],
        )
        calls = GaugeMetricFamily(
            f"{PREFIX}_breaker_window_calls", "Calls counted in the breaker's sliding window", labels=["breaker"]
        )
        failures = GaugeMetricFamily(
            f"{PREFIX}_breaker_window_failures",
            "Transient failures counted in the breaker's sliding window",
            labels=["breaker"],
        )
        moved = CounterMetricFamily(
            f"{PREFIX}_breaker_transitions",
            "Circuit breaker transitions, by the state entered (operators' resets and forced openings included)",
            labels=["breaker", "state"],
        )
        for name, b in found.items():
            for each in (breakers.CLOSED, breakers.OPEN, breakers.HALF_OPEN):
                state.add_metric([name, each], 1 if b["state"] == each else 0)
                moved.add_metric([name, each], b["transitions"].get(each, 0))
            calls.add_metric([name], b["calls"])
            failures.add_metric([name], b["failures"])
        return [state, calls, failures, moved]
