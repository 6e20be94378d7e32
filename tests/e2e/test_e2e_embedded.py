"""End to end in the embedded mode, as `make run` starts it: a fresh var/ directory, one SQLite
file per service, the ASGI server with Celery worker threads in the same process. The order is
placed and read over real HTTP, and the security checks are tried through daphne."""

from __future__ import annotations

import base64
import http.cookiejar
import json
import os
import re
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request

import pytest

from loadtest.processes import Process, answers, serve_command
from tests.conftest import order_body
from tests.processes import ARTIFACTS, ROOT, free_port, wait_for

CUSTOMER = ("alice", "alice-demo-password")


def embedded_env(var_dir) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DATABASE_URL", "REDIS_URL", "CELERY_BROKER"))}
    # A short handling window: long enough to cancel in, short enough to wait for.
    return {
        **env,
        "SAGA_VAR_DIR": str(var_dir),
        "DJANGO_SETTINGS_MODULE": "sagaplatform.settings",
        "SHIPPING_HANDLING_SECONDS": "3",
    }


def call(base: str, method: str, path: str, body: dict | None = None, headers: dict | None = None) -> tuple[int, dict]:
    token = base64.b64encode(":".join(CUSTOMER).encode()).decode()
    request = urllib.request.Request(
        base + path,
        method=method,
        data=json.dumps(body).encode() if body is not None else None,
        headers={"Authorization": f"Basic {token}", "Content-Type": "application/json", **(headers or {})},
    )
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


@pytest.fixture
def embedded_server(tmp_path, request):
    env = {**embedded_env(tmp_path / "var"), **getattr(request, "param", {})}  # indirect: more settings
    for command in (["setup_databases"], ["seed_demo"]):
        subprocess.run([sys.executable, "manage.py", *command], cwd=ROOT, env=env, check=True, capture_output=True)
    port = free_port()
    log_path = ARTIFACTS / "embedded-server.log"
    log_path.unlink(missing_ok=True)
    server = Process("the embedded server", serve_command(port=port), env=env, log_path=log_path).start()
    base = f"http://127.0.0.1:{port}"
    try:
        server.wait_until(lambda: answers(base), timeout=30, message="the embedded server to answer")
        yield base
    finally:
        server.stop(timeout=10)


def finished(base: str, receipt: dict) -> dict:
    def done():
        _, detail = call(base, "GET", receipt["url"])
        return detail if detail["saga"]["state"] in {"completed", "compensated", "cancelled", "failed"} else None

    return wait_for(done, timeout=30, message="the embedded saga to finish")


def test_embedded_happy_path_over_http(embedded_server):
    status, receipt = call(embedded_server, "POST", "/api/orders/", order_body(), {"Idempotency-Key": "demo-1"})
    assert status == 202, receipt

    detail = finished(embedded_server, receipt)

    assert detail["saga"]["state"] == "completed"
    assert detail["status"] == "shipped"
    assert {s["state"] for s in detail["saga"]["steps"] if s["kind"] == "action"} == {"succeeded"}
    status, stock = call(embedded_server, "GET", "/api/inventory/SKU-MUG/")
    assert (status, stock["on_hand"], stock["reserved"]) == (200, 48, 0)  # 50 in the demo, 2 shipped
    # The same request again is the same order.
    status, again = call(embedded_server, "POST", "/api/orders/", order_body(), {"Idempotency-Key": "demo-1"})
    assert (status, again["id"]) == (202, receipt["id"])


def test_embedded_cancel_in_the_handling_window(embedded_server):
    status, receipt = call(embedded_server, "POST", "/api/orders/", order_body())
    assert status == 202

    def waiting_to_ship():
        _, detail = call(embedded_server, "GET", receipt["url"])
        # Before its saga starts, the order already lists the steps it will run (pending).
        steps = {s["name"]: s for s in detail["saga"]["steps"]}
        return steps["schedule_shipment"]["state"] == "succeeded"

    wait_for(waiting_to_ship, timeout=20, message="the parcel to be booked")
    status, body = call(embedded_server, "POST", f"{receipt['url']}cancel/", {"reason": "ordered by mistake"})
    assert status == 202, body

    detail = finished(embedded_server, receipt)
    assert (detail["saga"]["state"], detail["status"]) == ("cancelled", "cancelled")
    assert detail["failure"] == {"code": "cancelled", "message": "ordered by mistake"}
    status, stock = call(embedded_server, "GET", "/api/inventory/SKU-MUG/")
    assert (stock["on_hand"], stock["reserved"]) == (50, 0)
    status, refused = call(embedded_server, "POST", f"{receipt['url']}cancel/", {})
    assert (status, refused["code"]) == (409, "already_cancelled")


HANG = 10  # seconds the gateway keeps a tok_hang charge


@pytest.mark.parametrize("embedded_server", [{"PAYMENT_GATEWAY_HANG_SECONDS": str(HANG)}], indirect=True)
def test_embedded_a_hanging_gateway_call_holds_up_no_other_order(embedded_server):
    """The gateway is called with no transaction open: a charge waiting on it no longer holds the
    payments database's write lock (SQLite), so another order's payment goes through meanwhile."""
    status, hanging = call(embedded_server, "POST", "/api/orders/", order_body(token="tok_hang"))
    assert status == 202, hanging

    def charging():
        _, detail = call(embedded_server, "GET", hanging["url"])
        return {s["name"]: s["state"] for s in detail["saga"]["steps"]}.get("charge_payment") == "running"

    wait_for(charging, timeout=20, message="the hanging charge to start")
    started = time.monotonic()
    status, normal = call(embedded_server, "POST", "/api/orders/", order_body())
    assert status == 202, normal

    detail = finished(embedded_server, normal)
    elapsed = time.monotonic() - started

    assert detail["saga"]["state"] == "completed"
    # It went through while the gateway still held the other charge.
    assert elapsed < HANG, f"the normal order took {elapsed:.1f} s, behind a {HANG} s gateway call"
    _, still = call(embedded_server, "GET", hanging["url"])
    assert {s["name"]: s["state"] for s in still["saga"]["steps"]}["charge_payment"] == "running"
    assert finished(embedded_server, hanging)["saga"]["state"] == "completed"


def websocket_handshake(base: str, path: str, *, origin: str) -> int:
    """The HTTP status daphne answers a websocket handshake with (101: accepted)."""
    host = base.removeprefix("http://")
    address, _, port = host.partition(":")
    request = (
        f"GET {path} HTTP/1.1\r\nHost: {host}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        f"Sec-WebSocket-Key: {base64.b64encode(os.urandom(16)).decode()}\r\nSec-WebSocket-Version: 13\r\n"
        f"Origin: {origin}\r\n\r\n"
    )
    with socket.create_connection((address, int(port)), timeout=10) as sock:
        sock.sendall(request.encode())
        return int(sock.recv(1024).split(b" ", 2)[1])


def test_embedded_server_locks_out_guessing_and_checks_the_socket_origin(embedded_server):
    """Under daphne (Django's async middleware path, not the test client's): a locked-out guess is
    a JSON 429 on the API and a page that says why on the form; /healthz tells strangers only
    its status; a socket opened by a page on another port is refused."""
    guesses = []
    for _ in range(10):
        request = urllib.request.Request(
            embedded_server + "/api/orders/",
            headers={"Authorization": "Basic " + base64.b64encode(b"alice:guess").decode()},
        )
        try:
            urllib.request.urlopen(request, timeout=10)
        except urllib.error.HTTPError as error:
            guesses.append((error.code, json.loads(error.read())["code"], error.headers.get("Retry-After")))
    assert guesses[:9] == [(401, "authentication_failed", None)] * 9
    assert guesses[9] == (429, "too_many_failed_logins", "900")
    # The right password is refused too now, and the login page says why.
    assert call(embedded_server, "GET", "/api/orders/")[0] == 429
    browser = urllib.request.build_opener(urllib.request.HTTPCookieProcessor(http.cookiejar.CookieJar()))
    page = browser.open(embedded_server + "/accounts/login/", timeout=10).read().decode()
    csrf = re.search(r'name="csrfmiddlewaretoken" value="([^"]+)"', page).group(1)
    form = urllib.parse.urlencode({"username": "alice", "password": CUSTOMER[1], "csrfmiddlewaretoken": csrf})
    with pytest.raises(urllib.error.HTTPError) as refused:
        browser.open(embedded_server + "/accounts/login/", data=form.encode(), timeout=10)
    assert refused.value.code == 429
    assert "Too many failed logins for this user or from this address" in refused.value.read().decode()

    with urllib.request.urlopen(embedded_server + "/healthz", timeout=10) as response:
        assert json.loads(response.read()) == {"status": "ok"}

    port = int(embedded_server.rsplit(":", 1)[1])
    assert websocket_handshake(embedded_server, "/ws/dashboard/", origin=embedded_server) == 101
    assert websocket_handshake(embedded_server, "/ws/dashboard/", origin=f"http://127.0.0.1:{port + 1}") == 403
