"""`manage.py ramp`: orders at rising rates over HTTP, then whether every accepted order ended well.

It starts a stack of its own on the configured databases and broker (the web process on a free
port of 127.0.0.1, worker processes and beat, as `simulate --spawn-workers` does), and sends
orders open-loop: each step sends `rate` orders a second for `seconds`, on schedule whether or
not earlier ones were answered (a latency is measured from the moment the order was due, so a
late client counts against the server). Then it waits for every accepted order's saga to come to
rest and prints, per step: accepted, refused (429 or 503 with Retry-After), 5xx (any other,
a 503 without Retry-After included), p50/p99 of the answers, the most PostgreSQL connections
the web process and everything together held, and whether every accepted order ended completed
or compensated for a business reason.
"""

from __future__ import annotations

import http.client
import json
import math
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from django.conf import settings
from django.contrib.auth import get_user_model
from django.db import connections
from rest_framework.authtoken.models import Token

from loadtest.processes import free_port
from loadtest.simulate import ADDRESS, REST, WorkerPool, _seed
from orchestration.models import Saga
from orders.models import Order

# A compensation for one of these is the right end for an order, not a failure of the platform.
BUSINESS_FAILURES = {"card_declined", "insufficient_stock", "unknown_sku"}
CUSTOMERS = 100  # tokens the load is spread over, so no customer meets the per-user throttle alone


@dataclass
class Step:
    rate: float
    seconds: float
    statuses: Counter = field(default_factory=Counter)
    latencies: list[float] = field(default_factory=list)
    accepted: list[str] = field(default_factory=list)  # saga ids
    refusals: Counter = field(default_factory=Counter)  # 429 and 503 with Retry-After, by error code
    server_errors: int = 0  # any other 5xx (a 503 without Retry-After included)
    retry_after_missing: int = 0  # 429s without Retry-After
    settle_seconds: list[float] = field(default_factory=list)  # accepted -> at rest, per saga
    connections: Counter = field(default_factory=Counter)  # role -> most sessions seen at once
    outcomes: Counter = field(default_factory=Counter)
    lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def refused(self) -> int:
        return sum(self.refusals.values())

    @property
    def unanswered(self) -> int:
        return self.statuses[0]

    def percentile(self, p: float, values: list[float] | None = None) -> float:
        ordered = sorted(self.latencies if values is None else values)
        return 1000 * ordered[min(len(ordered) - 1, math.ceil(p * len(ordered)) - 1)] if ordered else 0.0

    @property
    def ended_well(self) -> bool:
        return self.outcomes["completed"] + self.outcomes["compensated (business)"] == len(self.accepted)


def _customers() -> list[str]:
    """API tokens for the ramp's customers (tokens: Basic would spend the CPU on password hashes)."""
    users = get_user_model().objects
    keys = []
    for i in range(CUSTOMERS):
        user, _ = users.get_or_create(username=f"ramp-{i}", defaults={"email": f"ramp-{i}@example.com"})
        keys.append(Token.objects.get_or_create(user=user)[0].key)
    return keys


def _request(port: int, method: str, path: str, *, body: dict | None = None, token: str = "", timeout: float = 30):
    """One HTTP request to 127.0.0.1:`port`: (status, headers, JSON body); status 0 if never answered."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    headers = {"Content-Type": "application/json"} | ({"Authorization": f"Token {token}"} if token else {})
    try:
        connection.request(method, path, body=json.dumps(body).encode() if body is not None else None, headers=headers)
        response = connection.getresponse()
        raw = response.read()
        try:
            data = json.loads(raw)
        except ValueError:
            data = {"raw": raw[:200].decode(errors="replace")}
        return response.status, dict(response.headers), data
    except OSError:  # refused, reset or timed out
        return 0, {}, {}
    finally:
        connection.close()


def _sessions_by_role() -> Counter:
    """PostgreSQL sessions on this stack's databases, per process role (`application_name`)."""
    names = [connections[alias].settings_dict["NAME"] for alias in settings.DATABASE_ALIASES]
    with connections["default"].cursor() as cursor:
        cursor.execute(
            "SELECT application_name, count(*) FROM pg_stat_activity WHERE datname = ANY(%s) AND pid <> pg_backend_pid()"
            " GROUP BY application_name",
            [names],
        )
        return Counter({(name or "?").removeprefix("sagaplatform-"): n for name, n in cursor.fetchall()})


def _watch_connections(step_of, stop: threading.Event) -> None:
    while not stop.wait(0.25):
        step = step_of()
        if step is None:
            continue
        seen = _sessions_by_role()
        seen["all"] = sum(seen.values())
        with step.lock:
            for role, count in seen.items():
                step.connections[role] = max(step.connections[role], count)
    connections.close_all()


def _wait_up(port: int, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if _request(port, "GET", "/healthz", timeout=2)[0]:
            return  # it answers (the health check may say degraded while the workers start)
        time.sleep(0.2)
    raise RuntimeError(f"the web process did not answer on port {port} in {timeout:g} s")


def _wait_for_workers(count: int, timeout: float = 60) -> None:
    from sagaplatform.celery import app

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if len(app.control.ping(timeout=0.5)) >= count:
            return
    raise RuntimeError(f"{count} worker(s) did not answer a ping in {timeout:g} s")


def run_ramp(
    *,
    rates: list[float],
    seconds: float,
    workers: int,
    decline_rate: float,
    settle_timeout: float,
    request_timeout: float,
    clients: int,
    out,
) -> bool:
    """Returns True when no step had a 5xx or an unanswered request and every accepted order ended well."""
    if settings.EMBEDDED_DATABASES or settings.EMBEDDED_BROKER:
        raise RuntimeError("the ramp loads the production stack: set DATABASE_URL and REDIS_URL")
    _seed()
    tokens = _customers()
    port = free_port()
    pool = WorkerPool(workers, step_timeout=30.0, handling_seconds=0.0, log_dir=settings.VAR_DIR)
    steps = [Step(rate, seconds) for rate in rates]
    current: list[Step | None] = [None]
    stop_watching = threading.Event()
    watcher = threading.Thread(target=_watch_connections, args=(lambda: current[0], stop_watching), daemon=True)
    try:
        pool.start()
        pool.start_web(port)
        _wait_up(port)
        _wait_for_workers(workers)
        out.write(
            f"ramp: {', '.join(f'{r:g}' for r in rates)} orders/s, {seconds:g} s each, to 127.0.0.1:{port}, {workers} worker(s); "
            f"ORDERS_MAX_PENDING={settings.ORDERS_MAX_PENDING}\n"
        )
        watcher.start()
        index = 0
        with ThreadPoolExecutor(max_workers=clients) as executor:
            for step in steps:
                current[0] = step
                total = round(step.rate * step.seconds)
                started = time.monotonic()
                for n in range(total):
                    due = started + n / step.rate
                    time.sleep(max(0.0, due - time.monotonic()))
                    declined = decline_rate > 0 and index % max(1, round(1 / decline_rate)) == 0
                    body = {
                        "items": [{"sku": "SIM-COMMON-1", "quantity": 1}],
                        "payment": {"token": "tok_declined" if declined else "tok_visa"},
                        "shipping_address": ADDRESS,
                    }
                    token = tokens[index % len(tokens)]
                    executor.submit(_send, step, port, token, body, due, request_timeout)
                    index += 1
                out.write(f"  {step.rate:g} orders/s: {total} sent in {time.monotonic() - started:.1f} s\n")
            # Leaving the block waits for the last answers.
        current[0] = None
        _settle(steps, settle_timeout)
    finally:
        stop_watching.set()
        pool.stop()
    _report(steps, out)
    return all(
        s.server_errors == 0 and s.unanswered == 0 and s.retry_after_missing == 0 and s.ended_well for s in steps
    )


def _send(step: Step, port: int, token: str, body: dict, due: float, timeout: float) -> None:
    status, headers, data = _request(port, "POST", "/api/orders/", body=body, token=token, timeout=timeout)
    latency = time.monotonic() - due
    with step.lock:
        step.statuses[status] += 1
        step.latencies.append(latency)
        if status == 202:
            step.accepted.append(data["saga"]["id"])
        elif status in (429, 503) and "Retry-After" in headers:
            step.refusals[data.get("code", "?")] += 1
        elif status >= 500:
            step.server_errors += 1
        elif status == 429:
            step.retry_after_missing += 1


def _settle(steps: list[Step], timeout: float) -> None:
    """Wait until every accepted order's saga is at rest (or the timeout), then sort the outcomes."""
    wanted = [saga_id for step in steps for saga_id in step.accepted]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if Saga.objects.filter(id__in=wanted, state__in=REST).count() == len(wanted):
            break
        time.sleep(1)
    sagas = {str(s.id): s for s in Saga.objects.filter(id__in=wanted)}
    accepted_at = {
        str(saga_id): at
        for saga_id, at in Order.objects.using("orders").filter(saga_id__in=wanted).values_list("saga_id", "created_at")
    }
    for step in steps:
        for saga_id in step.accepted:
            saga = sagas.get(saga_id)
            if saga is None:
                step.outcomes["never started"] += 1
                continue
            if saga.finished_at:
                step.settle_seconds.append((saga.finished_at - accepted_at[saga_id]).total_seconds())
            if saga.state == Saga.State.COMPLETED:
                step.outcomes["completed"] += 1
            elif saga.state == Saga.State.COMPENSATED:
                code = (saga.failure or {}).get("code")
                step.outcomes["compensated (business)" if code in BUSINESS_FAILURES else f"compensated ({code})"] += 1
            else:
                step.outcomes[saga.state] += 1


def _report(steps: list[Step], out) -> None:
    out.write(
        f"{'rate/s':>6} {'sent':>5} {'accepted':>8} {'refused':>7} {'5xx':>4} {'unanswered':>10} "
        f"{'p50 ms':>7} {'p99 ms':>7} {'web conns':>9} {'all conns':>9}  outcome of the accepted\n"
    )
    for s in steps:
        verdict = "ok" if s.ended_well else "NOT OK"
        detail = ", ".join(f"{k} {v}" for k, v in sorted(s.outcomes.items()))
        out.write(
            f"{s.rate:>6g} {sum(s.statuses.values()):>5} {len(s.accepted):>8} {s.refused:>7} {s.server_errors:>4} "
            f"{s.unanswered:>10} {s.percentile(0.5):>7.0f} {s.percentile(0.99):>7.0f} "
            f"{s.connections['web']:>9} {s.connections['all']:>9}  {verdict}: {detail or 'none accepted'}\n"
        )
        if s.refusals:
            out.write(f"       refused: {dict(s.refusals)}\n")
        if s.settle_seconds:
            out.write(
                f"       accepted to at rest: p50 {s.percentile(0.5, s.settle_seconds) / 1000:.1f} s, "
                f"p99 {s.percentile(0.99, s.settle_seconds) / 1000:.1f} s\n"
            )
        if s.retry_after_missing:
            out.write(f"       {s.retry_after_missing} refusal(s) without Retry-After\n")
        other = {k: v for k, v in s.statuses.items() if k not in (0, 202, 429, 503)}
        if other:
            out.write(f"       other answers: {dict(other)}\n")
    out.write("ramp: " + json.dumps([{"rate": s.rate, **_figures(s)} for s in steps]) + "\n")


def _figures(s: Step) -> dict:
    return {
        "accepted": len(s.accepted),
        "refused": s.refused,
        "server_errors": s.server_errors,
        "unanswered": s.unanswered,
        "p50_ms": round(s.percentile(0.5)),
        "p99_ms": round(s.percentile(0.99)),
        "connections": dict(s.connections),
        "refusals": dict(s.refusals),
        "settle_p99_s": round(s.percentile(0.99, s.settle_seconds) / 1000, 1),
        "outcomes": dict(s.outcomes),
        "ended_well": s.ended_well,
    }
