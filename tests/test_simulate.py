"""`manage.py simulate` as CI runs it: a few hundred orders with transient failures, declines,
latency and a SIGKILLed worker, on PostgreSQL and Redis, ending with a clean audit."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from django.conf import settings

from orchestration.models import Saga
from tests.processes import ARTIFACTS, ROOT, database_urls, flush_broker

pytestmark = [pytest.mark.production, pytest.mark.django_db(transaction=True, databases="__all__")]


def test_simulation_with_faults_and_a_worker_kill_ends_with_zero_violations(django_db_blocker):
    flush_broker()
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("DATABASE_URL")},
        **database_urls(),
        "REDIS_URL": settings.REDIS_URL,
        "EMAIL_BACKEND": "django.core.mail.backends.locmem.EmailBackend",
    }
    command = [sys.executable, "manage.py", "simulate", "-n", "200", "-c", "12", "--failure-rate", "0.2"]
    command += ["--decline-rate", "0.05", "--latency-ms", "10", "--spawn-workers", "2", "--kill-workers", "1"]
    command += ["--step-timeout", "5", "--timeout", "240"]
    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    ARTIFACTS.mkdir(exist_ok=True)
    (ARTIFACTS / "simulate.out").write_text(result.stdout + result.stderr)

    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "SIGKILL worker" in result.stdout
    assert "audit: 0 violation(s)" in result.stdout
    assert Saga.objects.count() == 200
    assert Saga.objects.filter(state="completed").count() > 100
