"""Benchmark: the place_order saga against a bare Celery chain of the same service calls.

The chain calls the same eight service functions on the same queues and databases, but with no
saga bookkeeping: no saga/step/event rows, no barrier, no outbox, no replies, no compensation.
The ratio of the two is the price of the guarantees.
"""

from __future__ import annotations

import json
import os
import statistics
import threading
import time
import uuid
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

from celery import chain, shared_task
from django.conf import settings
from django.db import connections

from loadtest import cpu_totals as cpu
from loadtest.processes import Process, worker_command

BENCH_SKU = "SKU-BENCH"
STYLES = ("orchestrated", "parallel", "tcc", "choreography")
ADDRESS = {"name": "Bench", "line1": "1 Load St", "city": "Paris", "postal_code": "75001", "country": "FR"}


# --- The bare chain: the same service calls, nothing else ---------------------------------------


def _slow_down(service: str, operation: str) -> None:
    """The latency the benchmark's fault rules add to this operation, as the saga's services
    get it (`faults.before`). Failures are the saga's only: the chain has no retry to absorb
    them, so a failed chain would never finish."""
    from sagaplatform.kernel import faults

    for rule in faults.rules_for(service):
        if rule.matches(service, operation) and rule.latency_ms:
            time.sleep(rule.latency_ms / 1000)


@shared_task(name="bench.reserve", ignore_result=True)
def chain_reserve(ctx: dict) -> None:
    _slow_down("inventory", "reserve")
    from inventory.services import reservation_reserve

    reservation_reserve(saga_id=ctx["saga_id"], order_id=ctx["order_id"], lines=ctx["items"])


@shared_task(name="bench.charge", ignore_result=True)
def chain_charge(ctx: dict) -> None:
    _slow_down("payments", "charge")
    from payments.services import charge_create

    charge_create(
        saga_id=ctx["saga_id"],
        order_id=ctx["order_id"],
        amount=Decimal(ctx["amount"]),
        currency="EUR",
        token="tok_visa",
    )


@shared_task(name="bench.approve", ignore_result=True)
def chain_approve(ctx: dict) -> None:
    _slow_down("orders", "approve")
    from orders.services import order_approve

    order_approve(order_id=ctx["order_id"])


@shared_task(name="bench.schedule", ignore_result=True)
def chain_schedule(ctx: dict) -> None:
    _slow_down("shipping", "schedule")
    from shipping.services import shipment_schedule

    shipment_schedule(saga_id=ctx["saga_id"], order_id=ctx["order_id"], address=ADDRESS)


@shared_task(name="bench.notify", ignore_result=True)
def chain_notify(ctx: dict) -> None:
    _slow_down("notifications", "send_confirmation")
    from django.db import transaction

    from notifications.models import Notification

    # The saga's notification step writes the row (and an outbox message); so does this.
    with transaction.atomic(using="notifications"):
        Notification.objects.using("notifications").create(
            saga_id=ctx["saga_id"],
            order_id=ctx["order_id"],
            channel="email",
            kind="order_confirmed",
            recipient="bench@example.com",
            subject="Your order is confirmed",
            body="bench",
        )


@shared_task(name="bench.dispatch", ignore_result=True)
def chain_dispatch(ctx: dict) -> None:
    _slow_down("shipping", "dispatch")
    from shipping.services import shipment_dispatch

    shipment_dispatch(saga_id=ctx["saga_id"])


@shared_task(name="bench.commit", ignore_result=True)
def chain_commit(ctx: dict) -> None:
    _slow_down("inventory", "commit")
    from inventory.services import reservation_commit

    reservation_commit(saga_id=ctx["saga_id"])


@shared_task(name="bench.ship", ignore_result=True)
def chain_ship(ctx: dict) -> None:
    _slow_down("orders", "ship")
    from orders.services import order_ship

    order_ship(order_id=ctx["order_id"])


def _chain_for(ctx: dict):
    steps = [
        (chain_reserve, "inventory"),
        (chain_charge, "payments"),
        (chain_approve, "orders"),
        (chain_schedule, "shipping"),
        (chain_dispatch, "shipping"),
        (chain_commit, "inventory"),
        (chain_ship, "orders"),
        (chain_notify, "notifications"),
    ]
    return chain(*(task.si(ctx).set(queue=queue) for task, queue in steps))


# --- Runner ----------------------------------------------------------------------------------


@dataclass
class Run:
    name: str
    submitted: dict = field(default_factory=dict)  # order id -> monotonic submit time
    finished: dict = field(default_factory=dict)  # order id -> monotonic finish time
    lock: threading.Lock = field(default_factory=threading.Lock)
    done: dict = field(default_factory=dict)  # order id -> threading.Event
    polls: int = 0  # the monitor's queries (one transaction each), left out of the database figures

    def figures(self) -> dict:
        latencies = sorted(self.finished[o] - self.submitted[o] for o in self.finished)
        span = max(self.finished.values()) - min(self.submitted.values())

        def pct(p: float) -> float:
            return round(1000 * latencies[min(len(latencies) - 1, int(p * len(latencies)))], 1)

        return {
            "orders": len(latencies),
            "throughput_per_s": round(len(latencies) / span, 1),
            "p50_ms": pct(0.50),
            "p95_ms": pct(0.95),
            "p99_ms": pct(0.99),
            "mean_ms": round(1000 * statistics.fmean(latencies), 1),
        }


def _pg_sessions() -> int:
    names = [connections[a].settings_dict["NAME"] for a in settings.DATABASE_ALIASES]
    with connections["default"].cursor() as cursor:
        cursor.execute("SELECT coalesce(sum(sessions), 0) FROM pg_stat_database WHERE datname = ANY(%s)", [names])
        return int(cursor.fetchone()[0])


def _seed(n: int) -> None:
    from inventory.services import stock_set
    from orders.models import Product

    Product.objects.using("orders").update_or_create(sku=BENCH_SKU, defaults={"name": "Bench", "unit_price": "10.00"})
    stock_set(sku=BENCH_SKU, on_hand=10 * n + 10_000)


def _place_saga_order(
    index: int,
    mode: str = "orchestrated",
    token: str = "tok_visa",  # noqa: S107 (a test card)
) -> tuple[str, str]:
    from orders.services import order_place

    placement = order_place(
        mode=mode,
        customer_id=1,
        customer_email="bench@example.com",
        items=[{"sku": BENCH_SKU, "quantity": 1}],
        payment_token=token,
        shipping_address=ADDRESS,
    )
    return str(placement.order.id), str(placement.order.saga_id)


def _place_chain_order(index: int) -> tuple[str, str]:
    from orders.models import Order, OrderLine

    saga_id = uuid.uuid4()
    order = Order.objects.using("orders").create(
        customer_id=1, customer_email="bench@example.com", total=Decimal("10.00"), shipping_address=ADDRESS
    )
    OrderLine.objects.using("orders").create(order=order, sku=BENCH_SKU, quantity=1, unit_price=Decimal("10.00"))
    _chain_for(
        {
            "saga_id": str(saga_id),
            "order_id": str(order.id),
            "items": [{"sku": BENCH_SKU, "quantity": 1}],
            "amount": "10.00",
        }
    ).apply_async()
    return str(order.id), str(saga_id)


def _finished_sagas(ids: list[str]) -> list[str]:
    from orchestration.models import Saga

    # At rest: ended, or parked for an operator (a failure rate can park a saga).
    at_rest = (*Saga.TERMINAL_STATES, Saga.State.PARKED)
    return [str(i) for i in Saga.objects.filter(id__in=ids, state__in=at_rest).order_by().values_list("id", flat=True)]


def _finished_chains(ids: list[str]) -> list[str]:
    from notifications.models import Notification

    return [
        str(i)
        for i in Notification.objects.using("notifications")
        .filter(saga_id__in=ids)
        .order_by()
        .values_list("saga_id", flat=True)
    ]


def drive(run: Run, *, n: int, concurrency: int, place, finished_ids, out, order_timeout: float = 120) -> None:
    """Closed loop: `concurrency` clients, each placing an order and waiting for it to finish.

    `place(i)` places the i-th order and returns (order id, saga id); `finished_ids(saga_ids)`
    returns those that are done. One monitor thread polls for all clients.
    """
    inflight: dict[str, str] = {}  # saga id -> order id
    stop = threading.Event()

    def monitor() -> None:
        while not stop.is_set():
            with run.lock:
                ids = list(inflight)
            if ids:
                run.polls += 1
            for saga_id in finished_ids(ids) if ids else []:
                now = time.monotonic()
                with run.lock:
                    order_id = inflight.pop(saga_id, None)
                if order_id:
                    run.finished[order_id] = now
                    run.done[order_id].set()
            time.sleep(0.01)
        connections.close_all()

    counter = iter(range(n))
    counter_lock = threading.Lock()

    def client() -> None:
        try:
            while True:
                with counter_lock:
                    index = next(counter, None)
                if index is None:
                    return
                submitted = time.monotonic()
                order_id, saga_id = place(index)
                event = threading.Event()
                with run.lock:
                    run.submitted[order_id] = submitted
                    run.done[order_id] = event
                    inflight[saga_id] = order_id
                if not event.wait(timeout=order_timeout):
                    raise RuntimeError(f"order {order_id} did not finish in {order_timeout:g} s")
        finally:
            connections.close_all()

    watcher = threading.Thread(target=monitor, daemon=True)
    watcher.start()
    with ThreadPoolExecutor(max_workers=concurrency) as pool:
        for future in [pool.submit(client) for _ in range(concurrency)]:
            future.result()
    stop.set()
    watcher.join()
    out.write(f"  {run.name}: {json.dumps(run.figures())}\n")


def start_worker(
    concurrency: int, log_path: Path, extra_env: dict | None = None, *, name: str = "bench", beat: bool = False
) -> Process:
    """A worker on every queue that also runs this module's bare-chain tasks (`--include`: no
    production worker imports them); with `beat`, beat runs inside it (`-B`)."""
    env = {
        **os.environ,
        "DJANGO_SETTINGS_MODULE": "sagaplatform.settings",
        "LOG_LEVEL": "WARNING",
        # The saga's notification step sends its e-mail; measure the platform, not the console.
        "EMAIL_BACKEND": "django.core.mail.backends.dummy.EmailBackend",
        "SHIPPING_HANDLING_SECONDS": "0",
        **(extra_env or {}),
    }
    log_path.unlink(missing_ok=True)
    command = worker_command(
        queues=settings.SAGA_QUEUES,
        name=f"{name}@%h",
        concurrency=concurrency,
        loglevel="WARNING",
        include=["loadtest.bench"],
        beat_schedule=log_path.with_suffix(".beat-schedule") if beat else None,
    )
    worker = Process(f"{name} worker", command, env=env, log_path=log_path).start()
    from celery import current_app

    worker.wait_until(
        lambda: any(name in str(reply) for reply in current_app.control.ping(timeout=0.5) or ()),
        message=f"the worker {name} to answer a ping",
    )
    return worker


# --- Options -----------------------------------------------------------------------------------


def fault_rules(*, failure_rate: str = "", latency_ms: str = "", faults: str = "") -> list:
    """The fault rules for `--failure-rate`, `--latency-ms` and `--faults`.

    `--failure-rate` and `--latency-ms` take a number for every operation of every service, or
    `target=value` pairs separated by commas, a target being `service.operation`, `service` or
    `*`: `--failure-rate payments.charge=0.2,shipping=0.05 --latency-ms 20`. `--faults` takes
    `SAGA_FAULTS`' own syntax (`kernel/faults.py`). A bad value raises ValueError."""
    from sagaplatform.kernel import faults as fault_injection

    merged: dict[tuple[str, str], dict] = {}

    def targets(spec: str, key: str, cast) -> None:
        for part in filter(None, (p.strip() for p in spec.split(","))):
            target, sep, raw = part.rpartition("=")
            if not sep:
                target, raw = "*", part
            service, _, operation = target.partition(".")
            services = settings.SERVICE_ALIASES if service in ("*", "") else (service,)
            for name in services:
                if name not in settings.SERVICE_ALIASES:
                    raise ValueError(
                        f"unknown service {name!r} in {part!r} (one of {', '.join(settings.SERVICE_ALIASES)})"
                    )
                try:
                    value = cast(raw)
                except ValueError:
                    raise ValueError(f"{key}: {raw!r} is not a number (in {part!r})") from None
                if value < 0 or (key == "failure_rate" and value > 1):
                    raise ValueError(f"{key}: {raw!r} is out of range (in {part!r})")
                merged.setdefault((name, operation or "*"), {})[key] = value

    targets(failure_rate, "failure_rate", float)
    targets(latency_ms, "latency_ms", int)
    rules = [fault_injection.Rule(service=s, operation=o, **values) for (s, o), values in merged.items()]
    for rule in fault_injection.parse(faults):
        if rule.service not in settings.SERVICE_ALIASES:
            raise ValueError(f"unknown service {rule.service!r} in --faults")
        rules.append(rule)
    return rules


def install_fault_rules(rules: list) -> None:
    """Replace the benchmark's fault rules in every service database (the workers read them
    within a second)."""
    from sagaplatform.kernel.models import FaultRule

    for alias in settings.SERVICE_ALIASES:
        FaultRule.objects.using(alias).all().delete()
    for rule in rules:
        FaultRule.objects.using(rule.service).create(
            service=rule.service,
            operation=rule.operation,
            failure_rate=rule.failure_rate,
            fail_first=rule.fail_first,
            latency_ms=rule.latency_ms,
            hang_seconds=rule.hang_seconds,
            crash_point=rule.crash_point,
            crashes_left=rule.crashes_left,
        )


def parse_styles(value: str | list[str]) -> list[str]:
    names = value.split(",") if isinstance(value, str) else [n for v in value for n in v.split(",")]
    styles = [n.strip() for n in names if n.strip()]
    unknown = [n for n in styles if n not in STYLES]
    if unknown or not styles:
        raise ValueError(f"unknown style {', '.join(unknown) or '(none)'}: one or more of {', '.join(STYLES)}")
    return list(dict.fromkeys(styles))


# --- The benchmark ---------------------------------------------------------------------------


def _bench_databases() -> list[str]:
    return [connections[a].settings_dict["NAME"] for a in settings.DATABASE_ALIASES]


# PostgreSQL publishes a backend's counters when it commits at most once a second, and an idle
# one's within 10 s: the database counters are read this long after the run.
PG_STATS_SETTLE_SECONDS = 11.0


def _pg_work() -> dict[str, int]:
    """The bench databases' counters: blocks touched (hit or read) and commits
    (pg_stat_database), and rows read by sequential scans (pg_stat_user_tables, per database): a
    query that scans a growing table shows there, whatever the machine's load; the benchmark's
    own polling reads by primary key and never does."""
    with connections["default"].cursor() as cursor:
        cursor.execute(
            "SELECT coalesce(sum(blks_hit + blks_read), 0), coalesce(sum(xact_commit), 0) "
            "FROM pg_stat_database WHERE datname = ANY(%s)",
            [_bench_databases()],
        )
        blocks, commits = cursor.fetchone()
    scanned = 0
    for alias in settings.DATABASE_ALIASES:
        with connections[alias].cursor() as cursor:
            cursor.execute("SELECT coalesce(sum(seq_tup_read), 0) FROM pg_stat_user_tables")
            scanned += int(cursor.fetchone()[0])
    return {"blocks": int(blocks), "seq_rows_read": scanned, "commits": int(commits)}


def _analyze() -> None:
    """Planner statistics for every bench database, as autovacuum keeps them in production:
    where it is off (CI's PostgreSQL), a table created empty is never analyzed, and each run
    would be planned from whatever the previous one left."""
    for alias in settings.DATABASE_ALIASES:
        if connections[alias].vendor == "postgresql":
            with connections[alias].cursor() as cursor:
                cursor.execute("ANALYZE")


def measure(name: str, *, n: int, concurrency: int, warmup: int, place, finished, workers: list[Process], out) -> dict:
    """Warm up, then drive `n` orders and return their figures with the CPU they cost and the
    database work per order (blocks, rows read, commits: the deterministic counterpart of CPU)."""
    if warmup:
        drive(
            Run(f"{name} (warm-up)"),
            n=warmup,
            concurrency=min(concurrency, warmup),
            place=place,
            finished_ids=finished,
            out=out,
        )
    for worker in workers:
        worker.check_alive()
    _analyze()
    time.sleep(PG_STATS_SETTLE_SECONDS)
    sessions_before = _pg_sessions()
    work_before = _pg_work()
    databases = _bench_databases()
    before = cpu.snapshot(workers=[w.pid for w in workers], databases=databases)
    run = Run(name)
    drive(run, n=n, concurrency=concurrency, place=place, finished_ids=finished, out=out)
    spent = cpu.delta(before, cpu.snapshot(workers=[w.pid for w in workers], databases=databases))
    time.sleep(PG_STATS_SETTLE_SECONDS)
    work_after = _pg_work()
    work_after["commits"] -= run.polls  # the benchmark's own polling, one transaction a poll
    work = {k: round((v - work_before[k]) / n, 1) for k, v in work_after.items()}
    per_order = cpu.per_order_ms(spent, n)
    figures = {**run.figures(), "new_pg_sessions": _pg_sessions() - sessions_before}
    figures["pg_per_order"] = work
    figures["cpu_ms_per_order"] = per_order["total"]
    figures["cpu_ms_per_order_own"] = per_order["total_own"]
    figures["cpu_ms_per_order_by_component"] = per_order
    return figures


def _outcomes(saga_ids: list[str]) -> dict:
    from django.db.models import Count

    from orchestration.models import Saga

    return dict(Saga.objects.filter(id__in=saga_ids).values_list("state").annotate(n=Count("id")).order_by())


def make_templates(styles: Iterable[str], *, per_style: int = 4, declined: int = 1, timeout: float = 120) -> list[str]:
    """Run a few real sagas of each style (most complete, `declined` compensate) and return
    their ids once all have finished: the shapes the pre-fill clones."""
    from loadtest.processes import wait_for

    ids = []
    for style in styles:
        for i in range(per_style + declined):
            ids.append(_place_saga_order(i, style, "tok_visa" if i < per_style else "tok_declined")[1])
    wait_for(
        lambda: len(_finished_sagas(ids)) == len(ids),
        timeout=timeout,
        interval=0.2,
        message="the template sagas to finish",
    )
    return ids


def _prefilled() -> int:
    from orchestration.models import Saga

    return Saga.objects.count()


def run_benchmark(
    *,
    n: int,
    concurrency: int,
    worker_concurrency: int,
    warmup: int,
    out,
    styles: Iterable[str] = ("orchestrated",),
    workers: int = 1,
    rules: list | None = None,
    prefill: int = 0,
    compare_prefill: int = 0,
    prefill_days: float = 30.0,
    chain: bool = True,
    rounds: int = 1,
    autovacuum: bool = True,
) -> dict:
    """The saga in each style against the bare chain, on an empty database or after `prefill`
    finished sagas were written; with `compare_prefill`, both in one run (empty first).

    With `rounds` > 1, each phase measures every style and the chain that many times, in reverse
    order in even rounds (saga then chain, chain then saga, ...), and reports the median of each
    figure and, for the ratios, the geometric mean of each round's own: the host's speed drifts
    over a run, a round's two halves ran back to back, and over an even number of rounds a steady
    drift favours each side as often as the other.

    With `autovacuum`, a server that runs no autovacuum gets its work done by the bench while
    it measures (`loadtest.autovacuum`), as a production server would do it."""
    from loadtest import prefill as history
    from loadtest.autovacuum import Autovacuum
    from loadtest.autovacuum import mode as autovacuum_mode

    if settings.EMBEDDED_DATABASES or settings.EMBEDDED_BROKER:
        raise RuntimeError("the benchmark measures the production stack: set DATABASE_URL and REDIS_URL")
    styles = list(styles)
    vacuum_mode = autovacuum_mode(enabled=autovacuum)
    phases = [("empty", 0), ("prefilled", compare_prefill)] if compare_prefill else [("", prefill)]
    _seed((n * rounds + warmup) * (len(styles) + 1) * len(phases) + 200)
    install_fault_rules([])
    log_dir = settings.VAR_DIR
    log_dir.mkdir(parents=True, exist_ok=True)
    # A retry is a delayed outbox row that only the relay publishes, and a lost attempt waits for
    # the sweeper: beat runs in the first worker, as in production. Retries happen with no fault
    # injected too: a charge that overtakes its card's registration is retried (seen once in
    # 520 orders at 32 in flight), and without the relay that order would never finish.
    processes = [
        start_worker(worker_concurrency, log_dir / f"bench-worker-{i}.log", name=f"bench{i}", beat=i == 0)
        for i in range(workers)
    ]
    results: dict = {}
    try:
        templates = None
        if any(count for _, count in phases):
            # Captured first, on a database that holds nothing else.
            templates = history.capture(make_templates(STYLES))
        out.write(
            f"{n} orders per run{f', {rounds} rounds (in reverse order in even ones)' if rounds > 1 else ''}, "
            f"{concurrency} concurrent clients, {workers} worker(s) -c {worker_concurrency}, "
            f"styles {', '.join(styles)}, fault rules {len(rules or [])} (beat on), cpu accounting "
            f"{'on' if cpu.available() else 'unavailable (no /proc)'}, debug {'on' if settings.DEBUG else 'off'}, "
            f"autovacuum {vacuum_mode}\n"
        )
        for phase, count in phases:
            stored = 0
            if count and templates:
                install_fault_rules([])
                filled = history.prefill(templates, count, max_age=timedelta(days=prefill_days), out=out)
                stored = filled["sagas"]
                out.write(
                    f"pre-filled {stored} finished sagas ({sum(filled['rows'].values())} rows) in {filled['seconds']} s\n"
                )
            install_fault_rules(rules or [])
            if rules:
                time.sleep(1.2)  # the workers' fault-rule caches (one second)
            with Autovacuum(enabled=autovacuum) as vacuums:
                by_round = [
                    _measure_round(
                        f"{phase + ' ' if phase else ''}{f'round {r + 1} ' if rounds > 1 else ''}",
                        styles=styles,
                        chain=chain,
                        reverse=r % 2 == 1,
                        n=n,
                        concurrency=concurrency,
                        warmup=warmup if r == 0 else 0,  # warmed up once per phase
                        workers=processes,
                        out=out,
                    )
                    for r in range(rounds)
                ]
            runs = _median_runs(by_round) if rounds > 1 else by_round[0]
            results[phase or "run"] = {"prefilled_sagas": stored, "stored_sagas": _prefilled(), **runs}
            results[phase or "run"]["autovacuum_emulated"] = len(vacuums.ran) if vacuums.active else None
            if rounds > 1:
                results[phase or "run"]["rounds"] = by_round
    finally:
        for process in processes:
            process.stop(timeout=30)
        install_fault_rules([])
    summary: dict = {
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": {"cpus": os.cpu_count(), "load_1m": round(os.getloadavg()[0], 2)},
        "orders": n,
        "concurrency": concurrency,
        "workers": workers,
        "worker_concurrency": worker_concurrency,
        "debug": settings.DEBUG,
        "styles": styles,
        "fault_rules": [r.__dict__ | {"pk": None} for r in rules or []],
        "autovacuum": vacuum_mode,
    }
    for phase, runs in results.items():
        block = dict(runs)
        bare = runs.get("chain")
        for style in styles:
            saga = runs[style]
            if bare and "rounds" in runs:
                # The geometric mean of each round's own ratios (its two halves ran back to back).
                per_round = [_ratios(r[style], r["chain"]) for r in runs["rounds"]]
                saga.update({k: round(statistics.geometric_mean(r[k] for r in per_round), 2) for k in per_round[0]})
                saga["round_ratios"] = per_round
            elif bare:
                saga.update(_ratios(saga, bare))
            out.write(
                f"{phase + ': ' if phase else ''}saga {style:12}: {saga['throughput_per_s']} orders/s  p50 {saga['p50_ms']} ms  "
                f"p95 {saga['p95_ms']} ms  p99 {saga['p99_ms']} ms  CPU {saga['cpu_ms_per_order']} ms/order "
                f"(own backends {saga['cpu_ms_per_order_own']})  new PG sessions {saga['new_pg_sessions']}  "
                f"per order PG blocks {saga['pg_per_order']['blocks']} seq-scanned rows {saga['pg_per_order']['seq_rows_read']} "
                f"commits {saga['pg_per_order']['commits']}\n"
            )
        if bare:
            out.write(
                f"{phase + ': ' if phase else ''}chain             : {bare['throughput_per_s']} orders/s  p50 {bare['p50_ms']} ms  "
                f"p95 {bare['p95_ms']} ms  p99 {bare['p99_ms']} ms  CPU {bare['cpu_ms_per_order']} ms/order "
                f"(own backends {bare['cpu_ms_per_order_own']})  new PG sessions {bare['new_pg_sessions']}  "
                f"per order PG blocks {bare['pg_per_order']['blocks']} seq-scanned rows {bare['pg_per_order']['seq_rows_read']} "
                f"commits {bare['pg_per_order']['commits']}\n"
            )
            for style in styles:
                saga = runs[style]
                out.write(
                    f"{phase + ': ' if phase else ''}ratio {style:12}: throughput saga/chain {saga['throughput_ratio']}  "
                    f"p50 saga/chain {saga['p50_ratio']}  CPU per order saga/chain {saga['cpu_ratio']}\n"
                )
        summary[phase or "run"] = block
    if compare_prefill:
        empty, full = results["empty"], results["prefilled"]
        growth = {}
        for key in [*styles, *(["chain"] if chain else [])]:
            growth[key] = {
                "throughput": round(full[key]["throughput_per_s"] / empty[key]["throughput_per_s"], 2),
                "p50": round(full[key]["p50_ms"] / empty[key]["p50_ms"], 2),
                "cpu_per_order": round(full[key]["cpu_ms_per_order"] / max(0.01, empty[key]["cpu_ms_per_order"]), 2),
                "cpu_per_order_own": round(
                    full[key]["cpu_ms_per_order_own"] / max(0.01, empty[key]["cpu_ms_per_order_own"]), 2
                ),
                **{
                    f"pg_{k}_per_order": round(v / max(0.1, empty[key]["pg_per_order"][k]), 2)
                    for k, v in full[key]["pg_per_order"].items()
                },
            }
            out.write(
                f"prefilled/empty {key:12}: throughput {growth[key]['throughput']}  p50 {growth[key]['p50']}  "
                f"CPU per order {growth[key]['cpu_per_order']} (own backends {growth[key]['cpu_per_order_own']})  "
                f"PG blocks {growth[key]['pg_blocks_per_order']} seq-scanned rows {growth[key]['pg_seq_rows_read_per_order']} "
                f"commits {growth[key]['pg_commits_per_order']}\n"
            )
        summary["prefilled_vs_empty"] = growth
    elif "run" in summary:
        # The flat keys of before (one style, no comparison) stay where scripts read them.
        run = summary["run"]
        first = run[styles[0]]
        summary.update({"saga": first, "chain": run.get("chain")})
        for key in ("throughput_ratio", "p50_ratio", "p99_ratio", "cpu_ratio"):
            if key in first:
                summary[key] = first[key]
    out.write(json.dumps(summary, default=str) + "\n")
    return summary


def _measure_round(
    label: str,
    *,
    styles: list[str],
    chain: bool,
    reverse: bool,
    n: int,
    concurrency: int,
    warmup: int,
    workers: list[Process],
    out,
) -> dict:
    """One round: each style's saga and then the bare chain (the other way round if `reverse`)."""
    runs: dict = {}
    sides = [*styles, *(["chain"] if chain else [])]
    for side in reversed(sides) if reverse else sides:
        if side == "chain":
            runs["chain"] = measure(
                f"{label}chain",
                n=n,
                concurrency=concurrency,
                warmup=warmup,
                place=_place_chain_order,
                finished=_finished_chains,
                workers=workers,
                out=out,
            )
            continue
        placed: list[str] = []

        def place(i: int, style: str = side, placed: list = placed) -> tuple[str, str]:
            order_id, saga_id = _place_saga_order(i, style)
            placed.append(saga_id)
            return order_id, saga_id

        figures = measure(
            f"{label}saga {side}",
            n=n,
            concurrency=concurrency,
            warmup=warmup,
            place=place,
            finished=_finished_sagas,
            workers=workers,
            out=out,
        )
        figures["outcomes"] = _outcomes(placed[-n:])
        runs[side] = figures
    if label and chain:
        for style in styles:
            ratios = _ratios(runs[style], runs["chain"])
            out.write(
                f"{label}ratio {style:12}: throughput saga/chain {ratios['throughput_ratio']}  "
                f"p50 saga/chain {ratios['p50_ratio']}  CPU per order saga/chain {ratios['cpu_ratio']}\n"
            )
    return runs


def _ratios(saga: dict, bare: dict) -> dict[str, float]:
    return {
        "throughput_ratio": round(saga["throughput_per_s"] / bare["throughput_per_s"], 2),
        "p50_ratio": round(saga["p50_ms"] / bare["p50_ms"], 2),
        "p99_ratio": round(saga["p99_ms"] / bare["p99_ms"], 2),
        "cpu_ratio": round(saga["cpu_ms_per_order"] / max(0.01, bare["cpu_ms_per_order"]), 2),
    }


def _median_runs(by_round: list[dict]) -> dict:
    """Each side's figures over the rounds: the median of each number (nested ones too), the
    outcomes added up."""

    def median(values: list, key: str = "") -> Any:
        if key == "outcomes":
            return {k: sum(v.get(k, 0) for v in values) for k in sorted({k for v in values for k in v})}
        if isinstance(values[0], dict):
            return {k: median([v[k] for v in values], k) for k in values[0]}
        if isinstance(values[0], int | float) and not isinstance(values[0], bool):
            return round(statistics.median(values), 2)
        return values[0]

    return {side: median([r[side] for r in by_round]) for side in by_round[0]}


def run_styles_benchmark(*, n: int, concurrency: int, worker_concurrency: int, latency_ms: int, out) -> dict:
    """End-to-end latency of each transaction style, with `latency_ms` added to every service
    operation (so the shape of the flow, sequential or parallel, is what the numbers show)."""
    from sagaplatform.kernel.models import FaultRule

    if settings.EMBEDDED_DATABASES or settings.EMBEDDED_BROKER:
        raise RuntimeError("the benchmark measures the production stack: set DATABASE_URL and REDIS_URL")
    _seed(4 * n + 100)
    for alias in settings.SERVICE_ALIASES:
        FaultRule.objects.using(alias).filter(operation="*").delete()
        if latency_ms:
            FaultRule.objects.using(alias).create(service=alias, operation="*", latency_ms=latency_ms)
    log_path = settings.VAR_DIR / "bench-worker.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    worker = start_worker(worker_concurrency, log_path)
    results = {}
    try:
        out.write(f"{n} orders per style, {concurrency} concurrent, {latency_ms} ms added to every service operation\n")
        for mode in ("orchestrated", "parallel", "tcc", "choreography"):
            run = Run(mode)
            drive(
                run,
                n=n,
                concurrency=concurrency,
                place=lambda i, mode=mode: _place_saga_order(i, mode),
                finished_ids=_finished_sagas,
                out=out,
            )
            results[mode] = run.figures()
    finally:
        worker.stop(timeout=30)
        for alias in settings.SERVICE_ALIASES:
            FaultRule.objects.using(alias).filter(operation="*").delete()
    base = results["orchestrated"]["p50_ms"]
    for mode, figures in results.items():
        out.write(
            f"{mode:13}: p50 {figures['p50_ms']:7.1f} ms  p95 {figures['p95_ms']:7.1f} ms  "
            f"{figures['throughput_per_s']:5.1f} orders/s  p50 vs orchestrated {figures['p50_ms'] / base:.2f}\n"
        )
    summary = {"orders": n, "concurrency": concurrency, "latency_ms": latency_ms, "styles": results}
    out.write(json.dumps(summary) + "\n")
    return summary
