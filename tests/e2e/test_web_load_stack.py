"""The web process for real, under load: it holds a bounded pool of connections, a database that
is down or saturated is a 503 with Retry-After (never a 500), and the ramp (`manage.py ramp`)
runs short against a real stack. Admission in-process is in tests/unit/api/test_web_load.py."""

from __future__ import annotations

import http.client
import json
import os
import subprocess
import sys
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

import psycopg
import pytest
from django.conf import settings
from django.core.management import call_command
from django.db import connections

from loadtest.processes import serve_command
from orders.models import Order
from sagaplatform.kernel.models import OutboxMessage
from tests.conftest import order_body
from tests.processes import ARTIFACTS, ROOT, database_urls, flush_broker, free_port, wait_for
from tests.stack import PASSWORD, Stack

# Load tests: each times what a stack refuses past its limit, and the ramp opens many connections.
pytestmark = pytest.mark.serial

URL = "/api/orders/"


def orders() -> int:
    return Order.objects.using("orders").count()


# --- The web process, for real ----------------------------------------------------------------


def call(port: int, method: str, path: str, body: dict | None = None, *, user: str = "loaded"):
    """(status, headers, JSON body) from the web process, HTTP Basic as `user`."""
    import base64

    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    auth = base64.b64encode(f"{user}:{PASSWORD}".encode()).decode()
    try:
        connection.request(
            method,
            path,
            body=json.dumps(body).encode() if body is not None else None,
            headers={"Authorization": f"Basic {auth}", "Content-Type": "application/json"},
        )
        response = connection.getresponse()
        raw = response.read()
        try:
            data = json.loads(raw)
        except ValueError:
            data = {"raw": raw[:300].decode(errors="replace")}
        return response.status, dict(response.headers), data
    finally:
        connection.close()


def serve(stack: Stack) -> int:
    """The web process alone (no worker is needed to accept orders), up when its port answers."""
    stack.start_redis()
    web = stack._spawn("web", serve_command(port=stack.web_port))

    def up() -> bool:
        try:
            connection = http.client.HTTPConnection("127.0.0.1", stack.web_port, timeout=2)
            connection.request("GET", "/api/")
            connection.getresponse().read()
            return True
        except OSError:
            return False

    web.wait_until(up, timeout=30, message="the web process")
    return stack.web_port


def web_sessions() -> Counter:
    """The web process's PostgreSQL sessions on the test databases, per alias."""
    aliases = {connections[alias].settings_dict["NAME"]: alias for alias in settings.DATABASE_ALIASES}
    with connections["default"].cursor() as cursor:
        cursor.execute(
            "SELECT datname, count(*) FROM pg_stat_activity"
            " WHERE application_name = 'sagaplatform-web' AND datname = ANY(%s) GROUP BY datname",
            [list(aliases)],
        )
        return Counter({aliases[name]: count for name, count in cursor.fetchall()})


@pytest.fixture
def loaded(django_user_model, catalogue):
    return django_user_model.objects.create_user("loaded", "loaded@example.com", PASSWORD)


@pytest.mark.production
@pytest.mark.postgres
@pytest.mark.django_db(transaction=True, databases="__all__")
def test_the_web_process_holds_a_bounded_pool_and_a_saturated_one_is_a_503(loaded):
    """One connection per alias, and the catalogue locked so that the first order holds it: the
    orders behind it wait DATABASE_POOL_TIMEOUT for a connection, then get a 503 (no 500, no
    extra connection), and the first goes through once the lock is gone."""
    stack = Stack("web-pool")
    stack.env |= {"DATABASE_POOL_MAX_SIZE": "1", "DATABASE_POOL_TIMEOUT": "1"}
    try:
        port = serve(stack)
        assert call(port, "GET", URL)[0] == 200  # every pool opened
        orders_db = connections["orders"].settings_dict
        with psycopg.connect(
            host=orders_db["HOST"], port=orders_db["PORT"] or 5432, user=orders_db["USER"], dbname=orders_db["NAME"]
        ) as blocker:
            blocker.execute("LOCK TABLE orders_product IN ACCESS EXCLUSIVE MODE")
            with ThreadPoolExecutor(max_workers=8) as clients:
                answers = [clients.submit(call, port, "POST", URL, order_body()) for _ in range(8)]
                wait_for(lambda: sum(a.done() for a in answers) >= 7, timeout=30, message="7 answers")
                held = web_sessions()
                blocker.rollback()  # the lock goes: the first order completes
                results = [answer.result() for answer in answers]
    finally:
        stack.stop()

    assert held["orders"] <= 1, held
    assert sum(held.values()) <= len(settings.DATABASE_ALIASES), held
    statuses = Counter(status for status, _, _ in results)
    assert set(statuses) == {202, 503}, [(s, d) for s, _, d in results]
    assert statuses[202] == 1
    for status, headers, data in results:
        if status == 503:
            assert data["code"] == "service_unavailable"
            assert set(data) == {"code", "message", "details"}
            assert headers["Retry-After"] == str(data["details"]["retry_after"])
    assert orders() == 1
    assert OutboxMessage.objects.using("orders").count() == 2  # the order's start and card


@pytest.mark.production
@pytest.mark.postgres
@pytest.mark.django_db(transaction=True, databases="__all__")
def test_a_database_that_is_down_is_a_503_with_retry_after(loaded):
    stack = Stack("web-db-down")
    stack.env |= {
        "DATABASE_URL_ORDERS": f"postgres://postgres@127.0.0.1:{free_port()}/nothing_listens_here",
        "DATABASE_POOL_TIMEOUT": "1",
    }
    try:
        port = serve(stack)
        placed = call(port, "POST", URL, order_body())
        listed = call(port, "GET", URL)
    finally:
        stack.stop()

    for status, headers, data in (placed, listed):
        assert status == 503, data
        assert data["code"] == "service_unavailable"
        assert headers["Retry-After"] == str(data["details"]["retry_after"])
    assert "Traceback" not in stack.log("web")


# --- The ramp ---------------------------------------------------------------------------------


@pytest.mark.production
@pytest.mark.postgres
@pytest.mark.django_db(transaction=True, databases="__all__")
@pytest.mark.timeout(270)  # the ramp's subprocess is given 240 s; pytest's 120 s would orphan its stack
def test_a_short_ramp_has_no_5xx_refuses_past_the_limit_and_every_accepted_order_ends_well():
    for alias in settings.DATABASE_ALIASES:
        call_command("flush", database=alias, interactive=False, verbosity=0)
    flush_broker()
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("DATABASE_URL")},
        **database_urls(),
        "REDIS_URL": settings.REDIS_URL,
        "EMAIL_BACKEND": "django.core.mail.backends.locmem.EmailBackend",
        "ORDERS_MAX_PENDING": "6",
    }
    result = subprocess.run(
        [
            sys.executable,
            "manage.py",
            "ramp",
            "--rates",
            "3,30",
            "--seconds",
            "3",
            "--workers",
            "1",
            "--settle-timeout",
            "120",
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
    )
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    (ARTIFACTS / "ramp.out").write_text(result.stdout + result.stderr)

    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    (line,) = [line for line in result.stdout.splitlines() if line.startswith("ramp: [")]
    slow, fast = json.loads(line.removeprefix("ramp: "))
    for step in (slow, fast):
        assert (step["server_errors"], step["unanswered"], step["ended_well"]) == (0, 0, True), step
    assert slow["accepted"] >= 6  # the limit is never reached before 6 are pending
    assert fast["refused"] > 0  # 30 orders/s is more than one worker decides: admission said no
    assert fast["connections"]["web"] <= len(settings.DATABASE_ALIASES) * settings.DATABASE_POOL_MAX_SIZE
    # -c 2: one per alias a child, and the main process's registry heartbeat (one, on default).
    assert fast["connections"].get("celery-worker", 0) <= 2 * len(settings.DATABASE_ALIASES) + 1
    assert Order.objects.using("orders").count() == slow["accepted"] + fast["accepted"]  # refused: nothing written
