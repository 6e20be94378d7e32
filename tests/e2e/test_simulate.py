"""`manage.py simulate` as CI runs it: every style's orders with transient failures, declines,
latency and a SIGKILLed worker, on PostgreSQL and Redis, ending with a clean audit."""

from __future__ import annotations

import os
import subprocess
import sys
from collections import Counter, defaultdict

import pytest
from django.conf import settings
from django.core.management import call_command

from orchestration.models import Saga
from tests.processes import ARTIFACTS, ROOT, database_urls, flush_broker

# The simulation may take the 300 s its subprocess is given (its orders the 240 s of --timeout):
# pytest-timeout's default of 120 s killed `manage.py simulate` mid-run on a busy machine, and
# its worker processes (sessions of their own) outlived it.
pytestmark = [
    pytest.mark.serial,  # clients, two workers and a kill: many of PostgreSQL's 100 connections
    pytest.mark.production,
    pytest.mark.django_db(transaction=True, databases="__all__"),
    pytest.mark.timeout(330),
]


@pytest.fixture(autouse=True)
def empty_start(django_db_blocker):
    """The audit is global: start from empty databases and an empty broker, whatever a worker
    of an earlier test module wrote after that module's last flush."""
    for alias in settings.DATABASE_ALIASES:
        call_command("flush", database=alias, interactive=False, verbosity=0)
    flush_broker()


def simulate(*args: str, label: str) -> subprocess.CompletedProcess:
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("DATABASE_URL")},
        **database_urls(),
        "REDIS_URL": settings.REDIS_URL,
        "EMAIL_BACKEND": "django.core.mail.backends.locmem.EmailBackend",
    }
    result = subprocess.run(
        [sys.executable, "manage.py", "simulate", *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300
    )
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    (ARTIFACTS / f"simulate-{label}.out").write_text(result.stdout + result.stderr)
    # The tail holds the violations and the story of each one's saga (`loadtest.simulate.saga_story`).
    assert result.returncode == 0, result.stdout[-8000:] + result.stderr[-3000:]
    assert "audit: 0 violation(s)" in result.stdout
    return result


def test_simulation_of_every_style_with_faults_and_a_worker_kill_ends_with_zero_violations():
    """One run of every style in turn (40 orders each) through transient failures, declines,
    latency and a worker SIGKILLed mid-run: each style must both complete and compensate orders,
    and the audit must find nothing (four separate runs per style took three times as long)."""
    result = simulate(
        *("--mode", "mixed", "-n", "160", "-c", "16", "--failure-rate", "0.2", "--decline-rate", "0.1"),
        *("--latency-ms", "10", "--spawn-workers", "2", "--kill-workers", "1", "--step-timeout", "5"),
        *("--timeout", "240"),
        label="mixed-kill",
    )

    assert "SIGKILL worker" in result.stdout
    assert Saga.objects.count() == 160
    by_style: dict[str, Counter[str]] = defaultdict(Counter)
    for mode, state in Saga.objects.values_list("context__mode", "state"):
        by_style[mode][state] += 1
    assert {mode: sum(states.values()) for mode, states in by_style.items()} == {
        "orchestrated": 40,
        "parallel": 40,
        "tcc": 40,
        "choreography": 40,
    }
    for mode, states in by_style.items():
        assert states["completed"] > 0, (mode, dict(states))
        assert states["compensated"] > 0, (mode, dict(states))
