"""`manage.py bench_search`: the operators' search over a large history, timed per query kind.

Fills the (scratch) database with N finished and open sagas, their steps and events, then runs
each kind of search the dashboard and the API offer through the real views (`GET
/api/sagas/search/`, `GET /api/sagas/`: the filters, the count and the first page, serialized)
and prints the median, p95 and worst time of each. `make bench-search` runs it on a fresh
PostgreSQL database (BENCH_SEARCH_DATABASE_URL).
"""

from __future__ import annotations

import os
import random
import statistics
import time
import uuid
from datetime import timedelta
from urllib.parse import quote

from django.contrib.auth import get_user_model
from django.core.management.base import BaseCommand, CommandError
from django.db import connections
from django.utils import timezone
from rest_framework.test import APIRequestFactory, force_authenticate

from orchestration.apis import SagaListApi
from orchestration.console_apis import SagaSearchApi
from orchestration.definitions import DEFINITIONS
from orchestration.models import Saga, SagaEvent, SagaStep

DB = "default"
BUDGET_MS = 300.0
SKUS = [f"SKU-{i:03d}" for i in range(40)]
FAILURES = ["card_declined", "insufficient_stock", "retries_exhausted", "deadline_exceeded", "cancelled"]
# What share of the history is in each state (most sagas finished long ago).
STATES = [
    ("completed", 0.78),
    ("compensated", 0.08),
    ("failed", 0.03),
    ("cancelled", 0.03),
    ("parked", 0.03),
    ("running", 0.04),
    ("compensating", 0.01),
]


class Command(BaseCommand):
    help = "Fill a scratch database with sagas and time every kind of search over them."

    def add_arguments(self, parser):
        parser.add_argument("--sagas", type=int, default=10_000, help="how many sagas to store (default 10,000)")
        parser.add_argument("--runs", type=int, default=30, help="timed runs of each query")
        parser.add_argument("--seed", type=int, default=14)
        parser.add_argument(
            "--reuse", action="store_true", help="time the sagas already stored instead of refusing a non-empty DB"
        )

    def handle(self, *args, sagas: int, runs: int, seed: int, reuse: bool, **options):
        rng = random.Random(seed)
        stored = Saga.objects.using(DB).count()
        if stored and not reuse:
            raise CommandError(
                f"The database already holds {stored} sagas: run this on a scratch database "
                "(`make bench-search`), or pass --reuse to time those."
            )
        if not stored:
            started = time.perf_counter()
            self.fill(sagas, rng)
            self.stdout.write(f"stored {sagas:,} sagas in {time.perf_counter() - started:.1f} s")
        connection = connections[DB]
        if connection.vendor == "postgresql":
            with connection.cursor() as cursor:
                cursor.execute("ANALYZE orchestration_saga; ANALYZE orchestration_sagastep")
        total = Saga.objects.using(DB).count()
        load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
        self.stdout.write(
            f"searching {total:,} sagas on {connection.vendor}, {runs} runs per query "
            f"(load average {load} on {os.cpu_count()} CPUs: a busy machine inflates every figure)\n"
        )
        user = self.operator()
        sample = Saga.objects.using(DB).order_by("?").first()
        if sample is None:  # only with --sagas 0
            raise CommandError("No saga to search for.")
        parked = Saga.objects.using(DB).filter(state="parked").first() or sample
        context = sample.context
        now = timezone.now()
        week_ago = quote((now - timedelta(days=7)).isoformat())
        day_ago = quote((now - timedelta(days=1)).isoformat())
        queries = [
            ("newest (no filter)", ""),
            ("page 100", "page=100"),
            ("saga id", f"q={sample.id}"),
            ("order id", f"q={context['order_id']}"),
            ("order id (filter)", f"order_id={context['order_id']}"),
            ("customer e-mail", f"q={quote(context['customer_email'])}"),
            ("customer id", f"customer={context['customer_id']}"),
            ("SKU", f"sku={SKUS[7]}"),
            ("definition", "definition=place_order_tcc"),
            ("state", "state=parked"),
            ("stuck", "state=stuck"),
            ("failure code", "failure_code=card_declined"),
            ("step", "step=charge_payment"),
            ("step + state", "step=charge_payment&step_state=failed"),
            ("time range", f"created_after={week_ago}&created_before={day_ago}"),
            ("combined", f"definition=place_order&state=compensated&created_after={week_ago}&sku={SKUS[3]}"),
            ("parked saga's id", f"q={parked.id}"),
        ]
        factory = APIRequestFactory()
        views = {"search": SagaSearchApi.as_view(), "list": SagaListApi.as_view()}
        self.stdout.write(f"{'query':<22} {'endpoint':<8} {'matches':>8} {'median':>9} {'p95':>9} {'worst':>9}")
        worst_overall = 0.0
        for label, query in queries:
            for endpoint, view in views.items():
                timings, count = [], None
                for _ in range(runs + 1):  # the first run warms the caches and is not counted
                    request = factory.get(f"/api/sagas/{endpoint}/?{query}")
                    force_authenticate(request, user=user)
                    began = time.perf_counter()
                    response = view(request)
                    response.render()
                    timings.append((time.perf_counter() - began) * 1000)
                    if response.status_code != 200:
                        raise CommandError(f"{label}: {response.status_code} {response.content[:300]!r}")
                    count = response.data["count"]
                timings = sorted(timings[1:])
                p95 = timings[min(len(timings) - 1, int(0.95 * len(timings)))]
                worst_overall = max(worst_overall, timings[-1])
                flag = "" if p95 < BUDGET_MS else "  OVER BUDGET"
                self.stdout.write(
                    f"{label:<22} {endpoint:<8} {count:>8,} {statistics.median(timings):>7.1f}ms "
                    f"{p95:>7.1f}ms {timings[-1]:>7.1f}ms{flag}"
                )
        verdict = "within" if worst_overall < BUDGET_MS else "OVER"
        self.stdout.write(f"\nworst single answer: {worst_overall:.1f} ms ({verdict} the {BUDGET_MS:.0f} ms budget)")

    def operator(self):
        user, _ = get_user_model().objects.get_or_create(
            username="bench-search", defaults={"is_staff": True, "is_superuser": True}
        )
        return user

    def fill(self, count: int, rng: random.Random) -> None:
        definitions = list(DEFINITIONS.values())
        now = timezone.now()
        states, weights = zip(*STATES, strict=True)
        batch = 500
        for start in range(0, count, batch):
            sagas, steps, events = [], [], []
            created_ats = []  # created_at is auto_now_add: set after the insert
            for _ in range(min(batch, count - start)):
                definition = rng.choice(definitions)
                state = rng.choices(states, weights)[0]
                created = now - timedelta(seconds=rng.uniform(0, 30 * 24 * 3600))
                customer = rng.randrange(1, 800)
                failure = None
                if state in ("compensated", "failed", "parked", "cancelled", "compensating"):
                    code = "cancelled" if state == "cancelled" else rng.choice(FAILURES[:-1])
                    failure = {"code": code, "message": code.replace("_", " ")}
                saga = Saga(
                    id=uuid.uuid4(),
                    definition=definition.name,
                    context={
                        "order_id": str(uuid.uuid4()),
                        "customer_id": customer,
                        "customer_email": f"customer{customer}@example.com",
                        "items": [
                            {"sku": sku, "quantity": rng.randint(1, 3)} for sku in rng.sample(SKUS, rng.randint(1, 3))
                        ],
                        "amount": f"{rng.uniform(5, 300):.2f}",
                        "currency": "EUR",
                        "payment_token": "tok_visa",
                        "shipping_address": {"name": "A", "city": "Paris", "country": "FR"},
                        "mode": definition.style,
                    },
                    state=state,  # a protected FSM field: set in the constructor only
                    failure=failure,
                    version=12,
                    finished_at=None if state in ("running", "parked", "compensating") else created,
                )
                sagas.append(saga)
                created_ats.append(created)
                failed_at = rng.randrange(len(definition.steps)) if failure else None
                for kind, group in (
                    (SagaStep.Kind.ACTION, definition.steps),
                    (SagaStep.Kind.ON_FAILURE, definition.on_failure),
                ):
                    for position, spec in enumerate(group):
                        step_state, error = "pending", None
                        if kind == SagaStep.Kind.ACTION and failure and failed_at is not None and position == failed_at:
                            step_state, error = "failed", {"code": failure["code"], "message": failure["message"]}
                        elif kind == SagaStep.Kind.ACTION and (failed_at is None or position < failed_at):
                            step_state = "succeeded"
                        steps.append(
                            SagaStep(
                                saga=saga,
                                name=spec.name,
                                kind=kind,
                                position=position,
                                service=spec.service,
                                state=step_state,
                                error=error,
                                attempts=1,
                            )
                        )
                for seq in range(1, 13):
                    events.append(SagaEvent(saga=saga, seq=seq, kind="step_succeeded", created_at=created))
            Saga.objects.using(DB).bulk_create(sagas)
            for saga, created_at in zip(sagas, created_ats, strict=True):
                saga.created_at = created_at
            Saga.objects.using(DB).bulk_update(sagas, ["created_at"])
            SagaStep.objects.using(DB).bulk_create(steps)
            SagaEvent.objects.using(DB).bulk_create(events)
