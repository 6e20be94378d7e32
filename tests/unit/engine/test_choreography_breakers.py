"""Choreography consults the circuit breakers: while a service's breaker (or the payment gateway's)
refuses calls, its reactions wait instead of failing, their attempts not consumed; they resume
once the breaker admits again, and the tracked saga's timeline shows each wait. Transient failures
count for the breaker, business failures do not."""

from __future__ import annotations

import pytest
from django.utils import timezone

from orchestration.models import Saga, SagaEvent, SagaStep
from payments.models import Charge
from sagaplatform.kernel import breakers, faults
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


def place(api, **kwargs) -> str:
    response = api.post("/api/orders/", {**order_body(**kwargs), "mode": "choreography"}, format="json")
    assert response.status_code == 202, response.content
    return response.json()["saga"]["id"]


def state(name: str) -> str:
    return breakers.states([name])[name]["state"]


def reactions(broker, reaction: str) -> list[dict]:
    return [m["payload"] for m in broker.delivered if m["payload"].get("reaction") == reaction]


def timeline(saga_id) -> list[tuple[str, str]]:
    return list(SagaEvent.objects.filter(saga_id=saga_id).order_by("seq").values_list("step", "kind"))


def test_a_reaction_waits_while_its_service_breaker_is_open_then_completes(alice_api, catalogue, broker):
    breakers.force("payments", "open", by="test", seconds=3600)  # held open until closed below
    saga_id = place(alice_api)

    # The in-test broker makes every delayed message due at once: the charge's reaction comes
    # back again and again while the breaker stays open, and waits each time.
    broker.deliver(limit=40)

    saga = Saga.objects.get(id=saga_id)
    assert saga.state == "running"
    charge = SagaStep.objects.get(saga=saga, name="charge_payment")
    deferred = SagaEvent.objects.filter(saga=saga, kind="step_deferred")
    assert deferred.count() >= 5
    assert {(e.step, e.data["breaker"], e.data["state"], e.data["attempt"]) for e in deferred} == {
        ("charge_payment", "payments", "open", 0)  # no attempt made
    }
    assert all(0 <= e.data["resume_in"] <= 3600 + 0.5 for e in deferred)
    # Every wait sends the same event back with the same attempt; nothing reached the gateway.
    charges = reactions(broker, "charge_payment:action")
    assert len(charges) >= 5
    assert {m["attempt"] for m in charges} == {1}
    assert not Charge.objects.using("payments").exists()
    assert charge.attempts == 1  # the tracker never nudged: each wait extended the step's lease
    assert SagaEvent.objects.filter(saga=saga, kind="event_nudged").count() == 0

    breakers.force("payments", "closed", by="test")
    broker.deliver()

    saga.refresh_from_db()
    assert saga.state == "completed", timeline(saga_id)
    charge.refresh_from_db()
    assert (charge.state, charge.attempts, charge.deferrals) == ("succeeded", 1, 0)
    assert Charge.objects.using("payments").get().state == "captured"
    kinds = [kind for step, kind in timeline(saga_id) if step == "charge_payment"]
    assert kinds.index("step_deferred") < kinds.index("step_succeeded")
    assert {m["attempt"] for m in reactions(broker, "charge_payment:action")} == {1}


def test_transient_failures_open_the_breaker_and_while_open_they_do_not_count(alice_api, catalogue, broker):
    charge_fails = FaultRule.objects.using("payments").create(service="payments", operation="charge", failure_rate=1.0)
    faults.clear_cache()
    ids = [place(alice_api) for _ in range(6)]
    # A long outage, compressed: every delayed retry and wait falls due at once.
    broker.deliver(limit=300)

    # Without the breaker each charge would have used its 5 attempts, and every order would
    # have been rejected for exhausted retries.
    assert state("payments") in ("open", "half_open")
    assert breakers.states(["payments"])["payments"]["opened"] >= 1
    assert set(Saga.objects.filter(id__in=ids).values_list("state", flat=True)) == {"running"}
    deferred = SagaEvent.objects.filter(saga_id__in=ids, kind="step_deferred")
    assert {e.data["breaker"] for e in deferred} == {"payments"}
    held = [e for e in deferred if e.data.get("not_counted")]
    assert held, "a failure while the breaker refused calls is held, not counted"
    for payload in reactions(broker, "charge_payment:action"):
        assert payload["attempt"] - payload.get("deferrals", 0) <= 5

    charge_fails.delete()
    faults.clear_cache()

    def finished() -> bool:
        broker.deliver(limit=50)
        return set(Saga.objects.filter(id__in=ids).values_list("state", flat=True)) == {"completed"}

    wait_for(finished, timeout=60, interval=0.1, message="every order to complete once payments recovers")
    assert state("payments") == "closed"
    steps = SagaStep.objects.filter(saga_id__in=ids, name="charge_payment")
    assert {s.state for s in steps} == {"succeeded"}
    # Every held failure is a deferral, not an attempt: counted over the whole run, since the
    # tracker may hear of the last held failures only once the outage is over (`deliver` stops
    # at its limit with their news still queued).
    held = [e for e in SagaEvent.objects.filter(saga_id__in=ids, kind="step_deferred") if e.data.get("not_counted")]
    assert sum(s.deferrals for s in steps) == len(held)
    assert not SagaEvent.objects.filter(saga_id__in=ids, kind="step_failed").exists()


def test_business_failures_do_not_count_for_the_breaker(alice_api, catalogue, broker):
    ids = [place(alice_api, token="tok_declined") for _ in range(6)]
    broker.deliver()
    assert set(Saga.objects.filter(id__in=ids).values_list("state", flat=True)) == {"compensated"}
    # Six declined cards (and the reactions around them): answers, not failures.
    assert breakers.detail(["payments"])["payments"]["calls"] >= 6
    assert breakers.detail(["payments"])["payments"]["failures"] == 0
    assert state("payments") == "closed"
    assert state(breakers.GATEWAY) == "closed"
    assert not SagaEvent.objects.filter(saga_id__in=ids, kind="step_deferred").exists()


def test_the_charge_waits_for_the_payment_gateway_breaker_without_calling_it(alice_api, catalogue, broker):
    breakers.force(breakers.GATEWAY, "open", by="test", seconds=3600)
    saga_id = place(alice_api)
    broker.deliver(limit=30)

    deferred = SagaEvent.objects.filter(saga_id=saga_id, kind="step_deferred")
    assert deferred.exists()
    assert {(e.step, e.data["breaker"]) for e in deferred} == {("charge_payment", breakers.GATEWAY)}
    assert not Charge.objects.using("payments").exists()  # the gateway was never called
    assert state("payments") == "closed"  # and payments itself did not fail

    breakers.force(breakers.GATEWAY, "closed", by="test")
    broker.deliver()
    assert Saga.objects.get(id=saga_id).state == "completed"
    assert Charge.objects.using("payments").get().state == "captured"


def test_a_wait_the_tracker_hears_of_first_creates_the_choreographed_saga(alice_api, catalogue, broker):
    """The tracker's queue may lag behind the services: the note that a reaction waits can be
    the first it hears of a saga. It creates the saga from the definition its context names."""
    breakers.force("payments", "open", by="test", seconds=3600)
    saga_id = place(alice_api)
    broker.deliver(limit=6, skip=("orchestration.track_event",))  # the tracker hears nothing yet
    notes = [m for m in broker.take("orchestration.track_event") if m["payload"]["event"] == "charge_payment.deferred"]
    assert notes
    broker.run(notes[0])

    saga = Saga.objects.get(id=saga_id)
    assert (saga.definition, saga.state) == ("place_order_choreography", "running")
    assert [kind for step, kind in timeline(saga_id) if step == "charge_payment"] == ["step_deferred"]

    breakers.force("payments", "closed", by="test")
    broker.deliver()  # the lost copies to the tracker: its leases ask for them again
    wait_for(lambda: sweep_and_deliver(broker, saga_id), timeout=60, interval=0.2, message="the saga to complete")


def sweep_and_deliver(broker, saga_id) -> bool:
    from orchestration import sweeper
    from orchestration.models import SagaStep as Step

    Step.objects.filter(saga_id=saga_id, deadline_at__isnull=False).update(deadline_at=timezone.now())
    sweeper.sweep_once()
    broker.deliver()
    return Saga.objects.get(id=saga_id).state == "completed"
