"""`manage.py simulate`: many concurrent orders under a fault plan, then the audit.

The fault plan is written as fault rules into the service databases (every worker picks them
up within a second): a transient failure rate and added latency on every service operation, a
share of declined cards, and optionally worker processes killed with SIGKILL mid-run. It waits
until every saga is at rest, prints outcomes, throughput and latency, and runs the audit.
"""

from __future__ import annotations

import os
import random
import re
import signal
import threading
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from django.conf import settings
from django.contrib.auth import get_user_model

from inventory.models import StockItem
from inventory.services import stock_set
from loadtest.bench import Run, drive
from loadtest.processes import Process, beat_command, serve_command, worker_command
from orchestration.audit import Violation, run_audit
from orchestration.models import Saga, SagaEvent
from orders.models import Product
from orders.services import order_place
from sagaplatform.kernel import faults
from sagaplatform.kernel.models import FaultRule

ADDRESS = {"name": "Sim", "line1": "1 Chaos Rd", "city": "Lyon", "postal_code": "69001", "country": "FR"}
# A few SKUs, one of them scarce, so some orders meet an empty shelf (a business failure).
SKUS = {"SIM-COMMON-1": 10**6, "SIM-COMMON-2": 10**6, "SIM-COMMON-3": 10**6, "SIM-SCARCE": 25}
REST = (*Saga.TERMINAL_STATES, Saga.State.PARKED)
MODES = ["orchestrated", "parallel", "tcc", "choreography"]


@dataclass
class Plan:
    orders: int = 200
    concurrency: int = 16
    failure_rate: float = 0.2
    decline_rate: float = 0.05
    latency_ms: int = 0
    spawn_workers: int = 0
    kill_workers: int = 0
    step_timeout: float = 10.0
    handling_seconds: float = 0.0
    mode: str = "orchestrated"  # or parallel, tcc, choreography; "mixed": the four in turn
    timeout: float = 600.0  # the longest one order may take to come to rest
    seed: int = 1
    # A payments outage: every charge fails (transient) for this many seconds from the start,
    # then payments recovers; with or without the circuit breakers (spawned workers).
    payments_outage: float = 0.0
    breaker: bool = True


class WorkerPool:
    """Worker processes (and one beat) this simulation starts, kills and restarts itself."""

    def __init__(
        self, count: int, step_timeout: float, handling_seconds: float, log_dir: Path, breaker: bool = True
    ) -> None:
        self.count, self.log_dir = count, log_dir
        self.env = {**os.environ, "SAGA_STEP_TIMEOUT_OVERRIDE": str(step_timeout), "SAGA_SWEEP_INTERVAL": "1"}
        self.env["BREAKER_ENABLED"] = "true" if breaker else "false"
        self.env["SHIPPING_HANDLING_SECONDS"] = str(handling_seconds)
        self.workers: list[Process] = []
        self.beat: Process | None = None
        self.web: Process | None = None

    def _worker(self, index: int, name: str) -> Process:
        command = worker_command(queues=settings.SAGA_QUEUES, name=f"{name}@%h", loglevel="WARNING")
        return Process(f"worker{index}", command, env=self.env, log_path=self.log_dir / f"simulate-worker{index}.log")

    def start(self) -> None:
        self.workers = [self._worker(i, f"sim{i}").start() for i in range(self.count)]
        schedule = self.log_dir / "simulate-beat-schedule"
        command = beat_command(schedule=schedule, loglevel="WARNING")
        self.beat = Process("beat", command, env=self.env, log_path=self.log_dir / "simulate-beat.log").start()

    def start_web(self, port: int) -> None:
        """The web process (`manage.py serve` on 127.0.0.1), for load that comes in over HTTP."""
        log_path = self.log_dir / "simulate-web.log"
        self.web = Process("web", serve_command(port=port), env=self.env, log_path=log_path).start()

    def kill_and_restart(self, index: int) -> None:
        self.workers[index].stop(sig=signal.SIGKILL)
        self.workers[index] = self._worker(index, f"sim{index}b").start()

    def stop(self) -> None:
        processes = [p for p in (self.web, *self.workers, self.beat) if p is not None]
        for process in processes:  # all at once, then wait for each
            process.send(signal.SIGTERM)
        for process in processes:
            process.wait_or_kill()


def _install_faults(plan: Plan) -> None:
    for alias in settings.SERVICE_ALIASES:
        FaultRule.objects.using(alias).filter(operation="*").delete()
        if plan.failure_rate or plan.latency_ms:
            FaultRule.objects.using(alias).create(
                service=alias, operation="*", failure_rate=plan.failure_rate, latency_ms=plan.latency_ms
            )
    faults.clear_cache()


def _clear_faults() -> None:
    for alias in settings.SERVICE_ALIASES:
        FaultRule.objects.using(alias).filter(operation="*").delete()
    faults.clear_cache()


def _seed() -> int:
    for sku, stock in SKUS.items():
        Product.objects.using("orders").update_or_create(sku=sku, defaults={"name": sku.title(), "unit_price": "9.99"})
        held = StockItem.objects.using("inventory").filter(sku=sku).values_list("reserved", flat=True).first() or 0
        stock_set(sku=sku, on_hand=held + stock)  # `stock` units free for this run
    user, _ = get_user_model().objects.get_or_create(username="simulator", defaults={"email": "sim@example.com"})
    return user.id


def run_simulation(plan: Plan, out) -> int:
    """Returns the number of audit violations."""
    rng = random.Random(plan.seed)
    customer_id = _seed()
    _install_faults(plan)
    pool: WorkerPool | None = None
    if plan.spawn_workers:
        pool = WorkerPool(plan.spawn_workers, plan.step_timeout, plan.handling_seconds, settings.VAR_DIR, plan.breaker)
        pool.start()
    elif settings.SAGA_EMBEDDED_WORKER:
        from sagaplatform import embedded

        settings.SHIPPING_HANDLING_SECONDS = plan.handling_seconds
        embedded.start()
    out.write(
        f"simulate: {plan.orders} {plan.mode} orders, {plan.concurrency} concurrent, transient failure rate {plan.failure_rate:.0%}, "
        f"declines {plan.decline_rate:.0%}, latency {plan.latency_ms} ms, kills {plan.kill_workers}\n"
    )
    tokens = ["tok_declined" if rng.random() < plan.decline_rate else "tok_visa" for _ in range(plan.orders)]
    # Mixed: the styles in turn, so each gets its share of orders, declines and kills.
    modes = [MODES[n % len(MODES)] if plan.mode == "mixed" else plan.mode for n in range(plan.orders)]
    # In an outage run every order can complete: no scarce SKU (its refusals would blur the figures).
    skus = sorted(k for k in SKUS if not (plan.payments_outage and k == "SIM-SCARCE"))
    baskets = [
        [{"sku": sku, "quantity": rng.randint(1, 3)} for sku in rng.sample(skus, rng.randint(1, 2))]
        for _ in range(plan.orders)
    ]
    kill_at = {plan.orders * (k + 1) // (plan.kill_workers + 1) for k in range(plan.kill_workers)} if pool else set()
    placed: list[str] = []
    lock = threading.Lock()
    outage = _start_outage(plan, out) if plan.payments_outage else None

    def place(i: int) -> tuple[str, str]:
        placement = order_place(
            customer_id=customer_id,
            customer_email="sim@example.com",
            items=baskets[i],
            payment_token=tokens[i],
            shipping_address=ADDRESS,
            mode=modes[i],
        )
        with lock:
            placed.append(str(placement.order.saga_id))
            if pool is not None and len(placed) in kill_at:
                victim = len(placed) % len(pool.workers)
                out.write(f"  SIGKILL worker {victim} after {len(placed)} orders\n")
                pool.kill_and_restart(victim)
        return str(placement.order.id), str(placement.order.saga_id)

    def at_rest(saga_ids: list[str]) -> list[str]:
        return [str(i) for i in Saga.objects.filter(id__in=saga_ids, state__in=REST).values_list("id", flat=True)]

    run = Run("simulation")
    try:
        drive(
            run,
            n=plan.orders,
            concurrency=plan.concurrency,
            place=place,
            finished_ids=at_rest,
            out=out,
            order_timeout=plan.timeout,
        )
        time.sleep(2 * settings.SAGA_SWEEP_INTERVAL + 1)  # let the last deliveries and relays land
    finally:
        if outage:
            outage["timer"].cancel()
            _end_outage(outage)
        if pool:
            pool.stop()
        _clear_faults()

    _report(placed, run.figures(), out)
    if outage:
        _report_outage(placed, outage, plan, out)
    violations = run_audit(gateway=True)  # its workers share this process's Redis
    report_violations(violations, out)
    return len(violations)


def report_violations(violations: list[Violation], out) -> None:
    """Each violation, and after the first of each saga (up to `TOLD_SAGAS`), its story."""
    told: set[str] = set()
    for violation in violations:
        out.write(f"  VIOLATION {violation}\n")
        found = SAGA_ID.search(violation.subject)
        if found and found[0] not in told and len(told) < TOLD_SAGAS:
            told.add(found[0])
            out.writelines(f"{line}\n" for line in saga_story(found[0]))
    out.write(f"audit: {len(violations)} violation(s)\n")


# A violation's saga is told in the run's output, all that a CI run keeps: the first few.
TOLD_SAGAS, TOLD_EVENTS = 2, 30
SAGA_ID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")


def saga_story(saga_id: str) -> list[str]:
    """A saga's style, state and timeline (its last `TOLD_EVENTS` events), one line each, with
    what each observed event's emitter said: enough to see which deliveries raced."""
    saga = Saga.objects.filter(id=saga_id).first()
    if saga is None:
        return [f"    (no saga {saga_id})"]
    lines = [f"    saga {saga.id}: {(saga.context or {}).get('mode') or saga.definition}, {saga.state}"]
    events = SagaEvent.objects.filter(saga=saga).order_by("-seq")[:TOLD_EVENTS]
    for event in reversed(list(events)):
        data = event.data or {}
        emitter = data.get("emitter") or {}
        said = " ".join(f"{key}={emitter[key]}" for key in ("service", "op", "status", "undone") if emitter.get(key))
        heard = f" {data['event']}" if data.get("event") else ""
        moved = f" {event.from_state}->{event.to_state}" if event.from_state else ""
        line = f"    {event.seq:>3} {event.created_at:%H:%M:%S.%f} {event.kind} {event.step or '-'}{moved}"
        lines.append(f"{line}{heard} {said}".rstrip())
    return lines


def _report(placed: list[str], figures: dict, out) -> None:
    sagas = list(Saga.objects.filter(id__in=placed))
    outcomes = Counter(
        s.state if s.state != "compensated" else f"compensated ({(s.failure or {}).get('code')})" for s in sagas
    )
    events = Counter(SagaEvent.objects.filter(saga_id__in=placed).values_list("kind", flat=True))
    out.write(f"  outcomes: {dict(sorted(outcomes.items()))}\n")
    out.write(
        f"  {figures['throughput_per_s']} sagas/s; end-to-end latency p50 {figures['p50_ms']:.0f} ms  "
        f"p95 {figures['p95_ms']:.0f} ms  p99 {figures['p99_ms']:.0f} ms\n"
    )
    out.write(
        f"  retries {events['retry_scheduled']}, timeouts {events['step_timed_out']}, compensations "
        f"{events['step_compensated']}, compensation retries {events['compensation_retry_scheduled']}, parked {events['saga_parked']}\n"
    )


# --- A payments outage (`--payments-outage`), for the circuit breakers ------------------------


def _start_outage(plan: Plan, out) -> dict:
    from sagaplatform.kernel import breakers

    breakers.reset()
    FaultRule.objects.using("payments").create(service="payments", operation="charge", failure_rate=1.0)
    faults.clear_cache()
    out.write(
        f"  payments fails every charge for {plan.payments_outage:g} s; "
        f"circuit breakers {'on' if plan.breaker else 'off'}\n"
    )
    outage: dict = {"ended_at": None}
    outage["timer"] = threading.Timer(plan.payments_outage, _end_outage, args=(outage,))
    outage["timer"].start()
    return outage


def _end_outage(outage: dict) -> None:
    from django.db import connections

    from sagaplatform.kernel.clock import db_now

    if outage["ended_at"] is None:
        FaultRule.objects.using("payments").filter(operation="charge").delete()
        faults.clear_cache()
        outage["ended_at"] = db_now("default")
        connections.close_all()


def _report_outage(placed: list[str], outage: dict, plan: Plan, out) -> None:
    """What the outage did: orders rejected for exhausted retries, the breaker's transitions,
    and payments' answers per second after the recovery (from the charge steps' events)."""
    from orchestration.models import SagaStep
    from sagaplatform.kernel import breakers

    exhausted = SagaEvent.objects.filter(
        saga_id__in=placed, kind="step_failed", step="charge_payment", data__reason="retries_exhausted"
    ).count()
    deferred = SagaEvent.objects.filter(saga_id__in=placed, kind="step_deferred").count()
    state = breakers.states(["payments"]).get("payments", {})
    steps = SagaStep.objects.filter(saga_id__in=placed, name="charge_payment")
    not_counted = sum(s.deferrals for s in steps)
    out.write(
        f"  outage: {exhausted} charge(s) rejected for exhausted retries; {deferred} deferral(s), "
        f"{not_counted} failure(s) not counted; payments breaker opened {state.get('opened', 0)} time(s), "
        f"now {state.get('state', 'closed')}\n"
    )
    answers = SagaEvent.objects.filter(
        saga_id__in=placed,
        step="charge_payment",
        kind__in=["step_succeeded", "retry_scheduled", "step_failed"],
        created_at__gte=outage["ended_at"],
    ).values_list("created_at", flat=True)
    per_second = Counter(int((t - outage["ended_at"]).total_seconds()) for t in answers)
    out.write("  payments answers per second after the recovery:\n")
    for second in range(max(per_second, default=-1) + 1):
        out.write(f"    +{second:3d}s {per_second[second]:4d} {'#' * min(per_second[second], 60)}\n")
