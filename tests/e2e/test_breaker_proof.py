"""The circuit breakers' proof, with real workers: 120 orders while payments fails every charge
for 20 s and then recovers. With the breakers, every order completes, none is rejected for
exhausted retries, the payments breaker opened and closed, and payments' answers after the
recovery are spread out (the histogram is printed). Without them, orders are rejected. The
outputs are kept in test-artifacts/simulate-outage-*.out."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest
from django.conf import settings
from django.core.management import call_command

from orchestration.models import Saga
from tests.processes import ARTIFACTS, ROOT, database_urls, flush_broker

pytestmark = [
    pytest.mark.serial,  # 40 clients and two workers: most of PostgreSQL's 100 connections
    pytest.mark.production,
    pytest.mark.django_db(transaction=True, databases="__all__"),
    pytest.mark.timeout(600),
]

ARGS: tuple[str, ...] = ("-n", "120", "-c", "40", "--failure-rate", "0", "--decline-rate", "0")
ARGS += ("--payments-outage", "20", "--spawn-workers", "2", "--step-timeout", "10", "--timeout", "240")


@pytest.fixture(autouse=True)
def empty_start(django_db_blocker):
    for alias in settings.DATABASE_ALIASES:
        call_command("flush", database=alias, interactive=False, verbosity=0)
    flush_broker()


def simulate(*args: str, label: str) -> str:
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("DATABASE_URL")},
        **database_urls(),
        "REDIS_URL": settings.REDIS_URL,
        "EMAIL_BACKEND": "django.core.mail.backends.locmem.EmailBackend",
    }
    result = subprocess.run(
        [sys.executable, "manage.py", "simulate", *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=400
    )
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    (ARTIFACTS / f"simulate-outage-{label}.out").write_text(result.stdout + result.stderr)
    print(result.stdout)
    assert "audit: 0 violation(s)" in result.stdout, result.stdout[-3000:] + result.stderr[-3000:]
    return result.stdout


def test_with_the_breaker_every_order_completes_and_the_recovery_is_spread():
    out = simulate(*ARGS, label="breaker")

    assert Saga.objects.count() == 120
    assert Saga.objects.filter(state="completed").count() == 120, out
    assert "0 charge(s) rejected for exhausted retries" in out
    opened = int(re.search(r"payments breaker opened (\d+) time", out).group(1))
    assert opened >= 1
    assert "now closed" in out
    seconds = re.findall(r"^\s+\+\s*(\d+)s\s+(\d+)", out, re.MULTILINE)
    busy = [int(s) for s, n in seconds if int(n)]
    assert busy, out
    assert max(busy) >= 5, out  # answers keep coming over seconds, not all at once


def test_without_the_breaker_the_outage_rejects_orders():
    out = simulate(*ARGS, "--no-breaker", label="no-breaker")

    rejected = int(re.search(r"outage: (\d+) charge\(s\) rejected", out).group(1))
    assert rejected > 0, out
    assert Saga.objects.filter(state="compensated").count() == rejected
