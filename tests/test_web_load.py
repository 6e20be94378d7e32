"""The web process under load: admission refuses orders past ORDERS_MAX_PENDING, the web
process holds a bounded pool of connections, and a database that is down or saturated is a 503
with Retry-After, never a 500. The ramp (`manage.py ramp`) runs short against a real stack."""

from __future__ import annotations

import asyncio
import http.client
import json
import os
import subprocess
import sys
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta

import psycopg
import pytest
from django.conf import settings
from django.core.management import call_command
from django.db import connections
from django.utils import timezone

from orders.models import IdempotencyKey, Order
from orders.services import order_approve
from sagaplatform.kernel.models import OutboxMessage
from sagaplatform.overload import ConcurrencyLimit
from tests.chaos import PASSWORD, Stack
from tests.conftest import order_body
from tests.processes import ARTIFACTS, ROOT, database_urls, flush_broker, free_port, wait_for

URL = "/api/orders/"


def orders() -> int:
    return Order.objects.using("orders").count()


# --- Admission, in-process ------------------------------------------------------------------


@pytest.mark.django_db(databases="__all__")
def test_orders_past_the_pending_limit_are_refused_with_503_and_retry_after_and_write_nothing(
    alice_api, catalogue, broker, settings
):
    settings.ORDERS_MAX_PENDING = 2
    first = alice_api.post(URL, order_body(), format="json", HTTP_IDEMPOTENCY_KEY="first")
    assert first.status_code == 202
    assert alice_api.post(URL, order_body(), format="json").status_code == 202

    refused = alice_api.post(URL, order_body(), format="json", HTTP_IDEMPOTENCY_KEY="third")

    assert refused.status_code == 503
    assert refused.json() == {
        "code": "overloaded",
        "message": "Too many orders are in progress; retry in a moment",
        "details": {"retry_after": settings.API_RETRY_AFTER},
    }
    assert refused["Retry-After"] == str(settings.API_RETRY_AFTER)
    assert orders() == 2
    assert OutboxMessage.objects.using("orders").count() == 2
    assert list(IdempotencyKey.objects.using("orders").values_list("key", flat=True)) == ["first"]
    # A replay is not new work: it is answered whatever the load.
    replay = alice_api.post(URL, order_body(), format="json", HTTP_IDEMPOTENCY_KEY="first")
    assert (replay.status_code, replay["Idempotent-Replayed"]) == (202, "true")
    # Once a saga has decided an order, there is room for one more.
    order_approve(order_id=first.json()["id"])
    assert alice_api.post(URL, order_body(), format="json", HTTP_IDEMPOTENCY_KEY="third").status_code == 202
    assert orders() == 3


@pytest.mark.django_db(databases="__all__")
def test_orders_pending_for_over_an_hour_are_not_work_in_flight(alice_api, catalogue, broker, settings):
    settings.ORDERS_MAX_PENDING = 1
    assert alice_api.post(URL, order_body(), format="json").status_code == 202
    assert alice_api.post(URL, order_body(), format="json").status_code == 503

    # A parked saga's order stays pending, and is announced no more after an hour.
    Order.objects.using("orders").update(announced_at=timezone.now() - timedelta(hours=2))

    assert alice_api.post(URL, order_body(), format="json").status_code == 202


# --- The door: a concurrency limit before Django ----------------------------------------------


def test_past_the_concurrency_limit_requests_are_answered_503_at_once_and_websockets_pass():
    release = asyncio.Event()
    entered = []

    async def app(scope, receive, send):
        entered.append(scope["type"])
        await release.wait()
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"{}"})

    limited = ConcurrencyLimit(app, limit=2, retry_after=7)

    async def request(scope_type: str = "http") -> list[dict]:
        sent = []

        async def send(message):
            sent.append(message)

        await limited({"type": scope_type}, None, send)
        return sent

    async def scenario():
        slow = [asyncio.create_task(request()) for _ in range(2)]
        websocket = asyncio.create_task(request("websocket"))
        while len(entered) < 3:
            await asyncio.sleep(0)
        refused = await asyncio.wait_for(request(), timeout=1)  # answered without waiting
        release.set()
        answered = await asyncio.gather(*slow, websocket)
        return refused, answered, await request()

    refused, answered, after = asyncio.run(scenario())

    start, body = refused
    assert start["status"] == 503
    assert dict(start["headers"])[b"retry-after"] == b"7"
    assert json.loads(body["body"]) == {
        "code": "overloaded",
        "message": "The server is busy; retry in a moment.",
        "details": {"retry_after": 7},
    }
    assert [sent[0]["status"] for sent in answered] == [200, 200, 200]
    assert after[0]["status"] == 200  # the slots are free again
    assert entered == ["http", "http", "websocket", "http"]


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
    stack._spawn("web", [sys.executable, "manage.py", "serve", "--port", str(stack.web_port)])

    def up() -> bool:
        try:
            connection = http.client.HTTPConnection("127.0.0.1", stack.web_port, timeout=2)
            connection.request("GET", "/api/")
            connection.getresponse().read()
            return True
        except OSError:
            return False

    wait_for(up, timeout=30, message="the web process")
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
    assert OutboxMessage.objects.using("orders").count() == 1


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
    ARTIFACTS.mkdir(exist_ok=True)
    (ARTIFACTS / "ramp.out").write_text(result.stdout + result.stderr)

    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    (line,) = [line for line in result.stdout.splitlines() if line.startswith("ramp: [")]
    slow, fast = json.loads(line.removeprefix("ramp: "))
    for step in (slow, fast):
        assert (step["server_errors"], step["unanswered"], step["ended_well"]) == (0, 0, True), step
    assert slow["accepted"] >= 6  # the limit is never reached before 6 are pending
    assert fast["refused"] > 0  # 30 orders/s is more than one worker decides: admission said no
    assert fast["connections"]["web"] <= len(settings.DATABASE_ALIASES) * settings.DATABASE_POOL_MAX_SIZE
    assert fast["connections"].get("celery-worker", 0) <= 2 * len(
        settings.DATABASE_ALIASES
    )  # -c 2: one per alias a child
    assert Order.objects.using("orders").count() == slow["accepted"] + fast["accepted"]  # refused: nothing written


@pytest.mark.postgres
@pytest.mark.django_db(transaction=True, databases="__all__")
def test_a_page_whose_database_is_down_is_a_503_with_retry_after(alice, client):
    client.force_login(alice)
    orders_db = connections["orders"]
    port = orders_db.settings_dict["PORT"]
    orders_db.close()
    orders_db.settings_dict["PORT"] = str(free_port())  # nothing listens there
    try:
        page = client.get("/orders/")
    finally:
        orders_db.close()
        orders_db.settings_dict["PORT"] = port

    assert page.status_code == 503
    assert page["Retry-After"] == str(settings.API_RETRY_AFTER)
    assert "try again in a moment" in page.content.decode()
