"""Circuit breakers: the state machine (closed, open, half-open with bounded probes, closed again),
the half-open probe reservation under concurrent callers, business failures not counting, and the
engine deferring a service's steps while its breaker is open without consuming their retries."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import pytest

from orchestration import sweeper
from orchestration.engine import deferral
from orchestration.models import Saga, SagaEvent, SagaStep
from sagaplatform.kernel import breakers, faults
from sagaplatform.kernel.commands import BUSINESS_FAILURE, SUCCEEDED, TRANSIENT_ERROR
from sagaplatform.kernel.models import FaultRule
from tests.conftest import order_body
from tests.processes import wait_for

pytestmark = pytest.mark.django_db(transaction=True, databases="__all__")


@pytest.fixture(autouse=True)
def breaker_on(settings):
    settings.BREAKER_ENABLED = True
    settings.BREAKER_WINDOW = 30
    settings.BREAKER_MIN_CALLS = 4
    settings.BREAKER_FAILURE_RATE = 0.5
    settings.BREAKER_OPEN_SECONDS = 0.5
    settings.BREAKER_HALF_OPEN_PROBES = 2
    settings.BREAKER_PROBE_WAIT = 0.2
    settings.BREAKER_RESUME_SPREAD = 0.5
    breakers.reset()
    yield
    breakers.reset()


def state(name: str) -> str:
    return breakers.states([name])[name]["state"]


def test_the_breaker_opens_admits_bounded_probes_and_closes(settings):
    for ok in (True, False, False, False):
        breakers.record("payments", ok)
    assert state("payments") == "open"  # 3 of 4 calls failed, at least the 4 calls needed
    refused = breakers.admit("payments")
    assert (refused.admitted, refused.state) == (False, "open")
    assert 0 < refused.retry_at - refused.now <= 0.5

    half = wait_for(lambda: (v := breakers.admit("payments")).admitted and v, timeout=5, message="half-open")
    assert half.state == "half_open"
    assert breakers.admit("payments").admitted  # the second probe
    third = breakers.admit("payments")
    assert (third.admitted, third.state) == (False, "half_open")  # only two probes at once

    assert breakers.record("payments", True) == ""
    assert breakers.record("payments", True) == "closed"
    assert breakers.admit("payments").admitted
    # The failures from before it opened no longer count: one new failure does not reopen it.
    breakers.record("payments", False)
    assert state("payments") == "closed"


def test_a_failed_probe_opens_it_again():
    for _ in range(4):
        breakers.record("shipping", False)
    wait_for(lambda: breakers.admit("shipping").admitted, timeout=5, message="half-open")
    assert breakers.record("shipping", False) == "open"
    assert not breakers.admit("shipping").admitted
    assert breakers.states(["shipping"])["shipping"]["opened"] == 2


def test_too_few_calls_or_business_failures_never_open_it():
    for _ in range(3):
        deferral.record_reply("inventory", TRANSIENT_ERROR)
    assert state("inventory") == "closed"  # 3 calls: below the minimum of 4
    for _ in range(20):
        deferral.record_reply("payments", BUSINESS_FAILURE)  # declined cards: the service answered
    deferral.record_reply("payments", SUCCEEDED)
    assert state("payments") == "closed"


def test_concurrent_callers_share_the_half_open_probe_limit():
    for _ in range(4):
        breakers.record("payments", False)
    wait_for(lambda: breakers.states(["payments"])["payments"]["until"] is not None, timeout=5, message="open")
    # Wait out the open period without taking a probe.
    until = breakers.states(["payments"])["payments"]["until"]
    wait_for(lambda: breakers.admit("nobody").now >= until, timeout=5, message="the open period")

    count = 24
    start = threading.Barrier(count, timeout=30)

    def ask(_):
        start.wait()
        return breakers.admit("payments").admitted

    with ThreadPoolExecutor(max_workers=count) as pool:
        admitted = list(pool.map(ask, range(count)))
    assert admitted.count(True) == 2


def test_steps_wait_for_an_open_breaker_without_consuming_retries(alice_api, catalogue, broker, settings):
    settings.SAGA_RETRY_MAX_INTERVAL_OVERRIDE = 0.01
    charge_fails = FaultRule.objects.using("payments").create(service="payments", operation="charge", failure_rate=1.0)
    faults.clear_cache()
    ids = []
    for _ in range(6):
        response = alice_api.post("/api/orders/", order_body(), format="json")
        assert response.status_code == 202, response.content
        ids.append(response.json()["saga"]["id"])
    # The in-test broker lets every delayed retry fall due at once (deferred ones too), so the
    # failing charges are retried as fast as it can: a long outage compressed.
    broker.deliver(limit=300)

    # Without the breaker every charge would have run out of its 5 attempts and compensated.
    assert state("payments") in ("open", "half_open")
    bad = Saga.objects.filter(id__in=ids).exclude(state="running")
    assert not bad.exists(), [
        (e.step, e.kind, e.data.get("state"), e.data.get("attempt"), e.data.get("reason"))
        for e in SagaEvent.objects.filter(saga__in=bad).order_by("seq")
    ]
    charges = SagaStep.objects.filter(saga_id__in=ids, name="charge_payment")
    assert all(step.attempts - step.deferrals < 5 for step in charges)
    deferred = SagaEvent.objects.filter(saga_id__in=ids, kind="step_deferred")
    assert deferred.exists()
    assert {e.data["breaker"] for e in deferred} == {"payments"}

    charge_fails.delete()
    faults.clear_cache()

    def finished() -> bool:
        sweeper.sweep_once()  # starts the deferred steps that are due (and asks the breaker)
        broker.deliver()
        return set(Saga.objects.filter(id__in=ids).values_list("state", flat=True)) == {"completed"}

    wait_for(finished, timeout=30, interval=0.2, message="every order to complete after the recovery")
    assert all(s.attempts - s.deferrals <= 5 for s in SagaStep.objects.filter(saga_id__in=ids, name="charge_payment"))


def test_the_payment_gateway_is_not_called_while_its_breaker_is_open(alice_api, catalogue, broker, settings):
    from payments.models import Charge

    settings.BREAKER_OPEN_SECONDS = 60
    for _ in range(4):
        breakers.record(breakers.GATEWAY, False)
    response = alice_api.post("/api/orders/", order_body(), format="json")
    saga_id = response.json()["saga"]["id"]
    while not SagaEvent.objects.filter(saga_id=saga_id, kind="retry_scheduled", step="charge_payment").exists():
        assert broker.queue or broker.release_delayed(), list(
            SagaEvent.objects.filter(saga_id=saga_id).values_list("step", "kind", "data")
        )
        broker.run(broker.queue.pop(0))
    retry = SagaEvent.objects.get(saga_id=saga_id, kind="retry_scheduled", step="charge_payment")
    assert retry.data["error"]["code"] == "gateway_unavailable"
    assert "circuit breaker is open" in retry.data["error"]["message"]
    assert Charge.objects.using("payments").get().calls_in_doubt == 0  # no call was started


def test_parallel_steps_start_unless_their_own_breaker_refuses(alice_api, catalogue, broker, monkeypatch):
    """The steps one engine run starts together ask their breakers in one round trip
    (`deferral.defer_starts`, `breakers.admit_many`): a parallel saga whose payments breaker is
    open reserves its stock at once, and its charge alone waits, deferred, with no attempt."""
    breakers.force("payments", "open", by="test", seconds=60)
    asked = []
    admit_many = breakers.admit_many
    monkeypatch.setattr(breakers, "admit_many", lambda names: asked.append(list(names)) or admit_many(names))
    response = alice_api.post("/api/orders/", {**order_body(), "mode": "parallel"}, format="json")
    assert response.status_code == 202, response.content
    saga_id = response.json()["saga"]["id"]
    broker.deliver(limit=20)

    assert ["inventory", "payments"] in asked  # the two first steps, in one question
    steps = {s.name: s for s in SagaStep.objects.filter(saga_id=saga_id)}
    assert steps["reserve_stock"].state == "succeeded"
    charge = steps["charge_payment"]
    assert (charge.state, charge.attempts, charge.next_attempt_at is not None) == ("pending", 0, True)
    deferred = SagaEvent.objects.get(saga_id=saga_id, kind="step_deferred")
    assert (deferred.step, deferred.data["breaker"], deferred.data["state"]) == ("charge_payment", "payments", "open")
    assert not SagaEvent.objects.filter(saga_id=saga_id, kind="step_started", step="charge_payment").exists()
    assert Saga.objects.get(id=saga_id).state == "running"
