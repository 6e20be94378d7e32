"""Security: password guessing locked out per user and per address (HTTP Basic, the token
endpoint, the login form), the HTTP Basic check remembered without its password, `check
--deploy` clean in the documented production configuration, fault injection off in production,
and `/healthz` telling anonymous callers only its status.

(The websocket Origin check is in tests/unit/web/test_live_feed.py, with the other socket refusals.)"""

from __future__ import annotations

import base64
import os
import re
import subprocess
import sys
from datetime import timedelta
from typing import Any

import pytest
from axes.models import AccessAttempt
from django.contrib.auth.hashers import MD5PasswordHasher
from django.core.management import CommandError, call_command
from django.test import Client
from django.utils import timezone
from rest_framework.authtoken.models import Token
from rest_framework.test import APIClient

from sagaplatform import workers
from sagaplatform.kernel.models import FaultRule
from tests.conftest import make_user
from tests.processes import ROOT

pytestmark = pytest.mark.django_db(databases="__all__")

ORDERS = "/api/orders/"


def basic(username: str, password: str, *, address: str) -> Any:
    client = APIClient(REMOTE_ADDR=address)
    client.credentials(HTTP_AUTHORIZATION="Basic " + base64.b64encode(f"{username}:{password}".encode()).decode())
    return client.get(ORDERS)


@pytest.fixture
def limit(settings) -> int:
    return settings.AXES_FAILURE_LIMIT


@pytest.fixture
def hashes(monkeypatch) -> list[str]:
    """Every password hash the server checks (the costly part of a login)."""
    checked: list[str] = []
    verify = MD5PasswordHasher.verify

    def counting(self, password, encoded):
        checked.append(password)
        return verify(self, password, encoded)

    monkeypatch.setattr(MD5PasswordHasher, "verify", counting)
    return checked


# --- Lockout ------------------------------------------------------------------------------------


def test_guessing_a_users_password_over_http_basic_locks_that_user_and_that_address(limit, settings):
    alice = make_user("alice")
    make_user("bob")
    alice_token = Token.objects.create(user=alice)

    for _ in range(limit - 1):
        assert basic("alice", "guess", address="10.0.0.1").status_code == 401
    locked = basic("alice", "guess", address="10.0.0.1")

    assert locked.status_code == 429
    body = locked.json()
    assert body["code"] == "too_many_failed_logins"
    assert body["details"] == {"retry_after": 15 * 60}
    assert locked["Retry-After"] == str(15 * 60)
    # The right password no longer gets in, from that address or any other...
    assert basic("alice", "alice-pass", address="10.0.0.1").status_code == 429
    assert basic("alice", "alice-pass", address="10.0.0.2").status_code == 429
    # ...and the guesser's address is locked for everyone.
    assert basic("bob", "bob-pass", address="10.0.0.1").status_code == 429
    # Another user from another address is not affected, and alice's token keeps working.
    assert basic("bob", "bob-pass", address="10.0.0.2").status_code == 200
    token_client = APIClient(REMOTE_ADDR="10.0.0.1")
    token_client.credentials(HTTP_AUTHORIZATION=f"Token {alice_token.key}")
    assert token_client.get(ORDERS).status_code == 200
    # Nor can the locked user get a new token meanwhile.
    refused = APIClient(REMOTE_ADDR="10.0.0.2").post(
        "/api/auth/token/", {"username": "alice", "password": "alice-pass"}, format="json"
    )
    assert refused.status_code == 429
    assert refused.json()["code"] == "too_many_failed_logins"

    # The lockout lapses AUTH_LOCKOUT_MINUTES after the last failure.
    AccessAttempt.objects.update(attempt_time=timezone.now() - timedelta(minutes=16))
    assert basic("alice", "alice-pass", address="10.0.0.1").status_code == 200


def test_spraying_one_password_over_many_users_locks_the_address(limit):
    make_user("bob")
    for index in range(limit):
        basic(f"user{index}", "Winter2026!", address="10.0.0.3")

    assert basic("bob", "bob-pass", address="10.0.0.3").status_code == 429
    assert basic("bob", "bob-pass", address="10.0.0.4").status_code == 200


def test_a_forged_forwarded_for_header_does_not_dodge_the_address_lockout(limit):
    make_user("bob")
    for index in range(limit):
        client = APIClient(REMOTE_ADDR="10.0.0.5", HTTP_X_FORWARDED_FOR=f"192.0.2.{index}")
        client.credentials(HTTP_AUTHORIZATION="Basic " + base64.b64encode(f"user{index}:x".encode()).decode())
        client.get(ORDERS)

    assert basic("bob", "bob-pass", address="10.0.0.5").status_code == 429


def test_the_login_form_says_why_it_refuses_a_locked_user(limit):
    make_user("alice")
    make_user("bob")
    browser = Client(REMOTE_ADDR="10.0.1.1")
    for _ in range(limit - 1):
        wrong = browser.post("/accounts/login/", {"username": "alice", "password": "guess"})
        assert wrong.status_code == 200
        assert b"Too many failed logins" not in wrong.content

    locked = browser.post("/accounts/login/", {"username": "alice", "password": "guess"})
    assert locked.status_code == 429
    assert b"Too many failed logins for this user or from this address" in locked.content
    assert b'name="username"' in locked.content  # the form is still there, with the reason above it

    right = Client(REMOTE_ADDR="10.0.1.2").post("/accounts/login/", {"username": "alice", "password": "alice-pass"})
    assert right.status_code == 429
    assert "_auth_user_id" not in right.client.session
    admin_login = Client(REMOTE_ADDR="10.0.1.3").post("/admin/login/", {"username": "alice", "password": "alice-pass"})
    assert admin_login.status_code == 429
    assert b"Too many failed logins" in admin_login.content
    other = Client(REMOTE_ADDR="10.0.1.2")
    assert other.post("/accounts/login/", {"username": "bob", "password": "bob-pass"}).status_code == 302
    assert other.get("/orders/").status_code == 200


def test_successful_logins_never_count_towards_a_lockout(limit, settings):
    """The suite (and scripts) log in thousands of times: only failures count."""
    settings.API_BASIC_AUTH_CACHE_SECONDS = 0  # every request checks the password
    make_user("alice")

    for _ in range(limit - 1):
        assert basic("alice", "guess", address="10.0.2.1").status_code == 401
    for _ in range(3 * limit):
        assert basic("alice", "alice-pass", address="10.0.2.1").status_code == 200
    assert (
        Client(REMOTE_ADDR="10.0.2.1")
        .post("/accounts/login/", {"username": "alice", "password": "alice-pass"})
        .status_code
        == 302
    )


# --- The cost of HTTP Basic -----------------------------------------------------------------------


def test_a_successful_basic_check_is_remembered_but_never_a_wrong_one(hashes, limit):
    make_user("alice")

    for _ in range(5):
        assert basic("alice", "alice-pass", address="10.0.3.1").status_code == 200
    assert len(hashes) == 1  # one hash for five requests

    for _ in range(3):
        assert basic("alice", "guess", address="10.0.3.1").status_code == 401
    assert len(hashes) == 4  # every guess is checked (and counted by the lockout)
    assert AccessAttempt.objects.get(username="alice").failures_since_start == 3


def test_a_remembered_basic_check_ends_with_a_password_change_or_a_deactivation(hashes):
    alice = make_user("alice")
    assert basic("alice", "alice-pass", address="10.0.3.2").status_code == 200

    alice.set_password("new-pass")
    alice.save()
    assert basic("alice", "alice-pass", address="10.0.3.2").status_code == 401
    assert basic("alice", "new-pass", address="10.0.3.2").status_code == 200

    alice.is_active = False
    alice.save()
    assert basic("alice", "new-pass", address="10.0.3.2").status_code == 401


# --- Fault injection ------------------------------------------------------------------------------


def test_fault_injection_is_refused_unless_enabled(settings, admin_user, admin_client):
    settings.SAGA_FAULT_INJECTION = False
    api = APIClient()
    api.force_authenticate(admin_user)
    rule = {"service": "payments", "operation": "charge", "failure_rate": 1.0}

    for response in (api.get("/api/faults/"), api.post("/api/faults/", rule, format="json")):
        assert response.status_code == 403
        assert response.json()["code"] == "fault_injection_disabled"
    assert api.delete("/api/faults/payments/1/").status_code == 403
    assert admin_client.get("/admin/kernel/faultrule/", {"db": "payments"}).status_code == 403
    assert admin_client.get("/admin/kernel/faultrule/add/", {"db": "payments"}).status_code == 403
    assert b"/admin/kernel/faultrule/" not in admin_client.get("/admin/").content
    with pytest.raises(CommandError, match="SAGA_FAULT_INJECTION"):
        call_command("faults", "add", "payments.charge", "--failure-rate", "1")
    assert not FaultRule.objects.using("payments").exists()
    call_command("faults", "clear")  # turning faults off is always allowed

    settings.SAGA_FAULT_INJECTION = True
    assert api.post("/api/faults/", rule, format="json").status_code == 201
    assert admin_client.get("/admin/kernel/faultrule/", {"db": "payments"}).status_code == 200


# --- /healthz -----------------------------------------------------------------------------------


def test_healthz_tells_anonymous_callers_only_its_status(settings, monkeypatch):
    settings.SAGA_HEALTHZ_TOKEN = "monitor-secret-0123456789"
    workers.announce("celery@node-1", ["payments"])
    staff, customer = make_user("ops", staff=True), make_user("alice")
    staff_token, customer_token = Token.objects.create(user=staff), Token.objects.create(user=customer)

    def health(**headers):
        client = Client(**headers)
        return client.get("/healthz")

    anonymous = health()
    assert (anonymous.status_code, anonymous.json()) == (200, {"status": "ok"})
    for header in ("Bearer wrong", f"Token {customer_token.key}", "Basic b3BzOm9wcy1wYXNz", "Bearer"):
        assert health(HTTP_AUTHORIZATION=header).json() == {"status": "ok"}, header
    for header in ("Bearer monitor-secret-0123456789", f"Token {staff_token.key}", f"Bearer {staff_token.key}"):
        detailed = health(HTTP_AUTHORIZATION=header).json()
        assert set(detailed) == {"status", "databases", "broker", "workers"}, header
        assert "celery@node-1" in {w["name"] for w in detailed["workers"]}
    browser = Client()
    browser.force_login(staff)
    assert "databases" in browser.get("/healthz").json()

    monkeypatch.setattr(workers, "queue_depths", lambda: {"payments": None})
    down = health()
    assert (down.status_code, down.json()) == (503, {"status": "degraded"})
    down = health(HTTP_AUTHORIZATION="Bearer monitor-secret-0123456789")
    assert down.status_code == 503
    assert down.json()["broker"] == {"status": "unreachable", "queues": {"payments": None}}


# --- check --deploy ------------------------------------------------------------------------------


def documented_production_env() -> dict[str, str]:
    """The variables of the "Production over HTTPS" block of .env.example, as an operator
    uncomments them, with a real secret key in place of the placeholder."""
    text = (ROOT / ".env.example").read_text()
    block = text.split("# --- Production over HTTPS", 1)[1].split("\n# ---", 1)[0]
    variables = dict(re.findall(r"^# ([A-Z_]+)=(.*)$", block, flags=re.MULTILINE))
    assert variables["DJANGO_DEBUG"] == "0"
    variables["DJANGO_SECRET_KEY"] = base64.b64encode(os.urandom(48)).decode()
    return variables


def manage(*args: str, extra: dict[str, str]) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DJANGO_", "SAGA_", "DATABASE_URL", "REDIS_URL"))}
    env |= {"DJANGO_SETTINGS_MODULE": "sagaplatform.settings", **extra}
    return subprocess.run(
        [sys.executable, "manage.py", *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120
    )


def test_check_deploy_is_clean_in_the_documented_production_configuration():
    production = documented_production_env()

    clean = manage("check", "--deploy", "--fail-level", "WARNING", extra=production)
    assert clean.returncode == 0, clean.stdout + clean.stderr
    assert "System check identified no issues" in clean.stdout

    # The same without the HTTPS settings warns: the settings above are what makes it clean.
    plain = {k: v for k, v in production.items() if k in ("DJANGO_DEBUG", "DJANGO_SECRET_KEY", "DJANGO_ALLOWED_HOSTS")}
    warned = manage("check", "--deploy", "--fail-level", "WARNING", extra=plain)
    assert warned.returncode != 0
    for check in ("security.W004", "security.W008", "security.W012", "security.W016"):
        assert check in warned.stderr + warned.stdout, check

    # Fault injection is off in production unless explicitly enabled.
    read = "from django.conf import settings; print(settings.SAGA_FAULT_INJECTION, settings.SECURE_PROXY_SSL_HEADER)"
    shell = manage("shell", "--no-imports", "-c", read, extra=production)
    assert shell.stdout.strip() == "False ('HTTP_X_FORWARDED_PROTO', 'https')", shell.stdout + shell.stderr
