"""Workers' clocks may disagree: every lease, retry time and deadline is database time, so a
worker whose own clock is ten minutes off neither times steps out early nor waits too long."""

from __future__ import annotations

from pathlib import Path

import pytest

from orchestration.models import Saga, SagaEvent, SagaStep
from tests.conftest import order_body
from tests.processes import Worker, flush_broker, wait_for

# Preloaded into the worker itself (the `faketime` wrapper would stand between the test and the
# worker's signals).
LIBFAKETIME = Path("/usr/lib/x86_64-linux-gnu/faketime/libfaketime.so.1")

pytestmark = [
    pytest.mark.production,
    pytest.mark.django_db(transaction=True, databases="__all__"),
    pytest.mark.skipif(not LIBFAKETIME.exists(), reason="needs Debian's faketime (libfaketime)"),
]


@pytest.mark.parametrize("skew", ["-10m", "+10m"])
def test_a_worker_with_a_skewed_clock_times_nothing_out(django_db_blocker, alice_api, catalogue, skew):
    flush_broker()
    # A 3 s step timeout: were leases worker time, ten minutes of skew would expire (or
    # stretch) every one of them.
    skewed_clock = {"LD_PRELOAD": str(LIBFAKETIME), "FAKETIME": skew, "FAKETIME_DONT_FAKE_MONOTONIC": "1"}
    worker = Worker(name=f"skewed{skew}", extra_env={**skewed_clock, "SAGA_STEP_TIMEOUT_OVERRIDE": "3"}).start()
    try:
        receipt = alice_api.post("/api/orders/", order_body(token="tok_flaky_1"), format="json").json()
        saga_id = receipt["saga"]["id"]
        wait_for(
            lambda: Saga.objects.filter(id=saga_id, state="completed").exists(),
            timeout=45,
            message="the saga to complete under a skewed worker clock",
        )
    finally:
        worker.stop()

    assert not SagaEvent.objects.filter(saga_id=saga_id, kind="step_timed_out").exists()
    assert SagaStep.objects.get(saga_id=saga_id, name="charge_payment").attempts == 2  # one retry, on time
    retry = SagaEvent.objects.get(saga_id=saga_id, kind="retry_scheduled")
    step = SagaStep.objects.get(saga_id=saga_id, name="charge_payment")
    # The retry was due at database time: no ten-minute jump either way.
    assert abs((step.finished_at - retry.created_at).total_seconds()) < 30
