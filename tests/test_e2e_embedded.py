"""End to end in the embedded mode, as `make run` starts it: a fresh var/ directory, one SQLite
file per service, the ASGI server with Celery worker threads in the same process. The order is
placed and read over real HTTP."""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
import urllib.error
import urllib.request

import pytest

from tests.conftest import order_body
from tests.processes import ARTIFACTS, ROOT, free_port, wait_for

CUSTOMER = ("alice", "alice-demo-password")


def embedded_env(var_dir) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DATABASE_URL", "REDIS_URL", "CELERY_BROKER"))}
    return {**env, "SAGA_VAR_DIR": str(var_dir), "DJANGO_SETTINGS_MODULE": "sagaplatform.settings"}


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
def embedded_server(tmp_path):
    env = embedded_env(tmp_path / "var")
    for command in (["setup_databases"], ["seed_demo"]):
        subprocess.run([sys.executable, "manage.py", *command], cwd=ROOT, env=env, check=True, capture_output=True)
    port = free_port()
    ARTIFACTS.mkdir(exist_ok=True)
    log = (ARTIFACTS / "embedded-server.log").open("w")
    server = subprocess.Popen(
        [sys.executable, "manage.py", "serve", "--port", str(port)],
        cwd=ROOT,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    base = f"http://127.0.0.1:{port}"

    def up():
        try:
            with urllib.request.urlopen(base + "/healthz", timeout=1):
                return True
        except OSError:
            return False

    try:
        wait_for(up, timeout=30, message="the embedded server to answer")
        yield base
    finally:
        server.terminate()
        server.wait(timeout=10)
        log.close()


def test_embedded_happy_path_over_http(embedded_server):
    status, receipt = call(embedded_server, "POST", "/api/orders/", order_body(), {"Idempotency-Key": "demo-1"})
    assert status == 202, receipt

    def finished():
        _, detail = call(embedded_server, "GET", receipt["url"])
        return detail if detail["saga"]["state"] in {"completed", "compensated", "failed"} else None

    detail = wait_for(finished, timeout=30, message="the embedded saga to finish")

    assert detail["saga"]["state"] == "completed"
    assert detail["status"] == "approved"
    assert {s["name"]: s["state"] for s in detail["saga"]["steps"] if s["kind"] == "action"} == {
        "reserve_stock": "succeeded",
        "charge_payment": "succeeded",
        "approve_order": "succeeded",
        "schedule_shipment": "succeeded",
        "notify_customer": "succeeded",
    }
    status, stock = call(embedded_server, "GET", "/api/inventory/SKU-MUG/")
    assert (status, stock["reserved"], stock["available"]) == (200, 2, stock["on_hand"] - 2)
    # The same request again is the same order.
    status, again = call(embedded_server, "POST", "/api/orders/", order_body(), {"Idempotency-Key": "demo-1"})
    assert (status, again["id"]) == (202, receipt["id"])
