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
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path

from celery import chain, shared_task
from django.conf import settings
from django.db import connections

from loadtest.processes import ROOT, Process, worker_command

BENCH_SKU = "SKU-BENCH"
ADDRESS = {"name": "Bench", "line1": "1 Load St", "city": "Paris", "postal_code": "75001", "country": "FR"}


# --- The bare chain: the same service calls, nothing else ---------------------------------------


@shared_task(name="bench.reserve", ignore_result=True)
def chain_reserve(ctx: dict) -> None:
    from inventory.services import reservation_reserve

    reservation_reserve(saga_id=ctx["saga_id"], order_id=ctx["order_id"], lines=ctx["items"])


@shared_task(name="bench.charge", ignore_result=True)
def chain_charge(ctx: dict) -> None:
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
    from orders.services import order_approve

    order_approve(order_id=ctx["order_id"])


@shared_task(name="bench.schedule", ignore_result=True)
def chain_schedule(ctx: dict) -> None:
    from shipping.services import shipment_schedule

    shipment_schedule(saga_id=ctx["saga_id"], order_id=ctx["order_id"], address=ADDRESS)


@shared_task(name="bench.notify", ignore_result=True)
def chain_notify(ctx: dict) -> None:
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
    from shipping.services import shipment_dispatch

    shipment_dispatch(saga_id=ctx["saga_id"])


@shared_task(name="bench.commit", ignore_result=True)
def chain_commit(ctx: dict) -> None:
    from inventory.services import reservation_commit

    reservation_commit(saga_id=ctx["saga_id"])


@shared_task(name="bench.ship", ignore_result=True)
def chain_ship(ctx: dict) -> None:
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


def _place_saga_order(index: int, mode: str = "orchestrated") -> tuple[str, str]:
    from orders.services import order_place

    placement = order_place(
        mode=mode,
        customer_id=1,
        customer_email="bench@example.com",
        items=[{"sku": BENCH_SKU, "quantity": 1}],
        payment_token="tok_visa",
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

    return [
        str(i) for i in Saga.objects.filter(id__in=ids, state__in=Saga.TERMINAL_STATES).values_list("id", flat=True)
    ]


def _finished_chains(ids: list[str]) -> list[str]:
    from notifications.models import Notification

    return [
        str(i)
        for i in Notification.objects.using("notifications").filter(saga_id__in=ids).values_list("saga_id", flat=True)
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


def start_worker(concurrency: int, log_path: Path, extra_env: dict | None = None) -> Process:
    """A worker on every queue that also runs this module's bare-chain tasks (`--include`: no
    production worker imports them)."""
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
        name="bench@%h",
        concurrency=concurrency,
        loglevel="WARNING",
        include=["loadtest.bench"],
    )
    worker = Process("bench worker", command, env=env, log_path=log_path).start()
    from celery import current_app

    worker.wait_until(lambda: bool(current_app.control.ping(timeout=0.5)), message="the worker to answer a ping")
    return worker


def run_benchmark(*, n: int, concurrency: int, worker_concurrency: int, warmup: int, out) -> dict:
    if settings.EMBEDDED_DATABASES or settings.EMBEDDED_BROKER:
        raise RuntimeError("the benchmark measures the production stack: set DATABASE_URL and REDIS_URL")
    _seed(n + warmup)
    log_path = ROOT / "var" / "bench-worker.log"
    log_path.parent.mkdir(exist_ok=True)
    worker = start_worker(worker_concurrency, log_path)
    try:
        out.write(f"{n} orders, {concurrency} concurrent clients, worker -c {worker_concurrency}\n")
        results = {}
        for name, place, finished in (
            ("saga", _place_saga_order, _finished_sagas),
            ("chain", _place_chain_order, _finished_chains),
        ):
            if warmup:
                drive(
                    Run(f"{name} (warm-up)"),
                    n=warmup,
                    concurrency=min(concurrency, warmup),
                    place=place,
                    finished_ids=finished,
                    out=out,
                )
            sessions_before = _pg_sessions()
            run = Run(name)
            drive(run, n=n, concurrency=concurrency, place=place, finished_ids=finished, out=out)
            results[name] = {**run.figures(), "new_pg_sessions": _pg_sessions() - sessions_before}
    finally:
        worker.stop(timeout=30)
    saga, bare = results["saga"], results["chain"]
    summary = {
        "orders": n,
        "concurrency": concurrency,
        "worker_concurrency": worker_concurrency,
        "saga": saga,
        "chain": bare,
        "throughput_ratio": round(saga["throughput_per_s"] / bare["throughput_per_s"], 2),
        "p50_ratio": round(saga["p50_ms"] / bare["p50_ms"], 2),
        "p99_ratio": round(saga["p99_ms"] / bare["p99_ms"], 2),
    }
    out.write(
        f"saga  : {saga['throughput_per_s']} orders/s  p50 {saga['p50_ms']} ms  p95 {saga['p95_ms']} ms  "
        f"p99 {saga['p99_ms']} ms  new PG sessions {saga['new_pg_sessions']}\n"
        f"chain : {bare['throughput_per_s']} orders/s  p50 {bare['p50_ms']} ms  p95 {bare['p95_ms']} ms  "
        f"p99 {bare['p99_ms']} ms  new PG sessions {bare['new_pg_sessions']}\n"
        f"ratio : throughput saga/chain {summary['throughput_ratio']}  p50 saga/chain {summary['p50_ratio']}\n"
    )
    out.write(json.dumps(summary) + "\n")
    return summary


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
    log_path = ROOT / "var" / "bench-worker.log"
    log_path.parent.mkdir(exist_ok=True)
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
