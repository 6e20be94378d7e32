"""Processes' clocks may disagree: every lease, retry time and deadline is database time, and no
message carries a broker countdown (an ETA on the publisher's clock that the consumer waits for on
its own). So a service worker whose clock is ten minutes off, while the orchestrator and beat are
right, neither holds a retry nor drops a relay, and nothing times out."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from django.conf import settings

from orchestration.models import Saga, SagaEvent, SagaStep
from tests.conftest import order_body
from tests.processes import Worker, flush_broker, wait_for

# Preloaded into the worker itself (the `faketime` wrapper would stand between the test and the
# worker's signals).
LIBFAKETIME = Path("/usr/lib/x86_64-linux-gnu/faketime/libfaketime.so.1")

pytestmark = [pytest.mark.production, pytest.mark.django_db(transaction=True, databases="__all__")]


@pytest.fixture(autouse=True)
def _libfaketime():
    if not LIBFAKETIME.exists():
        reason = f"needs Debian's faketime ({LIBFAKETIME}; apt-get install faketime)"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(f"CI=true and {reason}: .ci/run installs it")
        pytest.skip(reason)


@pytest.mark.parametrize("skew", ["-10m", "+10m"])
def test_a_service_worker_with_a_skewed_clock_holds_no_retry(alice_api, catalogue, skew):
    flush_broker()
    # A 3 s step timeout: were leases worker time, ten minutes of skew would expire (or stretch)
    # every one of them.
    timeouts = {"SAGA_STEP_TIMEOUT_OVERRIDE": "3"}
    skewed_clock = {"LD_PRELOAD": str(LIBFAKETIME), "FAKETIME": skew, "FAKETIME_DONT_FAKE_MONOTONIC": "1"}
    orchestrator = Worker(name="orchestrator", queues=("orchestrator",), extra_env=timeouts).start()
    services = Worker(
        name=f"services{skew}", queues=settings.SERVICE_ALIASES, beat=False, extra_env={**timeouts, **skewed_clock}
    )
    try:
        services.start()
        # tok_flaky fails attempts 1 and 2: the orchestrator's retries reach the skewed worker,
        # and in the choreography the payments service retries itself, through its own relay.
        sagas = [
            alice_api.post("/api/orders/", {**order_body(token="tok_flaky"), "mode": mode}, format="json").json()[
                "saga"
            ]["id"]
            for mode in ("orchestrated", "parallel", "choreography")
        ]
        wait_for(
            lambda: Saga.objects.filter(id__in=sagas, state="completed").count() == len(sagas),
            timeout=45,
            message=f"every saga to complete with a service worker {skew} (states: "
            f"{list(Saga.objects.filter(id__in=sagas).values_list('state', flat=True))})",
        )
    finally:
        services.stop()
        orchestrator.stop()

    assert not SagaEvent.objects.filter(saga_id__in=sagas, kind="step_timed_out").exists()
    for saga_id in sagas[:2]:
        assert SagaStep.objects.get(saga_id=saga_id, name="charge_payment").attempts == 3
        # Each retry went out when due on the database clock: no ten-minute wait, no early start.
        charge = list(SagaEvent.objects.filter(saga_id=saga_id, step="charge_payment").order_by("seq"))
        retries = [e for e in charge if e.kind == "retry_scheduled"]
        assert len(retries) == 2
        for retry, outcome in zip(retries, charge[charge.index(retries[0]) + 1 :], strict=False):
            late = (outcome.created_at - retry.created_at).total_seconds() - retry.data["delay"]
            assert -0.05 < late < 5, f"attempt {retry.data['next_attempt']} ran {late:.2f} s after it was due"
