"""The broker settings refuse a visibility timeout that would redeliver a task still running."""

from __future__ import annotations

import os
import subprocess
import sys

from tests.processes import ROOT

SETUP = "import django; django.setup()"


def start(**variables: str) -> subprocess.CompletedProcess:
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith(("CELERY_", "DATABASE_URL"))},
        "DJANGO_SETTINGS_MODULE": "sagaplatform.settings",
        "REDIS_URL": "redis://127.0.0.1:6379/5",  # read, never connected to
        **variables,
    }
    return subprocess.run([sys.executable, "-c", SETUP], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)


def test_a_visibility_timeout_not_above_the_hard_time_limit_is_refused_at_start():
    refused = start(CELERY_VISIBILITY_TIMEOUT="150", CELERY_TASK_TIME_LIMIT="150")
    assert refused.returncode != 0
    assert "CELERY_VISIBILITY_TIMEOUT must exceed CELERY_TASK_TIME_LIMIT" in refused.stderr

    accepted = start(CELERY_VISIBILITY_TIMEOUT="151", CELERY_TASK_TIME_LIMIT="150")
    assert accepted.returncode == 0, accepted.stderr
