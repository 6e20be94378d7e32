"""A charge the gateway took whose local record failed, in every transaction style.

The fault comes after the gateway's answer: either the process dies between the answer and its
local record (`after_call`), or the action's own local transaction fails after the answer was
recorded (the command's `before_commit`; a choreographed reaction's injected failure, which comes
after its gateway call: the `--payments-outage` simulation's fault). Then (a) a retry succeeds:
one charge, kept; or (b) the retries run out and the saga compensates: the charge is recorded,
refunded once, and the gateway's records, the local rows and the audit all agree."""

from __future__ import annotations

from decimal import Decimal

import pytest

from orchestration.audit import run_audit
from orchestration.models import Saga
from payments import gateway, services
from payments.models import Charge, LedgerEntry
from sagaplatform.kernel import faults
from sagaplatform.kernel.models import Barrier, FaultRule, OutboxMessage
from tests.conftest import order_body

pytestmark = pytest.mark.django_db(transaction=True, databases="__all__")

MODES = ["orchestrated", "parallel", "tcc", "choreography"]
ACTION = {"orchestrated": "charge", "parallel": "charge", "tcc": "authorize", "choreography": "charge"}


class Crash(Exception):
    """A worker dying at a crash point (a real crash is SIGKILL; the test raises instead)."""


@pytest.fixture
def gateway_calls(monkeypatch):
    """Every call that reaches the gateway: (kind, key or reference)."""
    seen: list[tuple[str, str]] = []
    real_charge, real_refund = gateway.charge, gateway.refund

    def charge(**kwargs):
        seen.append(("charge", kwargs["idempotency_key"]))
        return real_charge(**kwargs)

    def refund(**kwargs):
        seen.append(("refund", kwargs["reference"]))
        return real_refund(**kwargs)

    monkeypatch.setattr(gateway, "charge", charge)
    monkeypatch.setattr(gateway, "refund", refund)
    return seen


def crash_at(monkeypatch, point: str, operation: str, times: int) -> list[str]:
    """Crash `times` times at `point` of payments' `operation` (every time if `times` is 0)."""
    real = faults.crash_if
    crashed: list[str] = []

    def crash_if(at, service, op):
        if at == point and service == "payments" and op == operation and (not times or len(crashed) < times):
            crashed.append(op)
            raise Crash(f"crash at {at} of {service}.{op}")
        return real(at, service, op)

    monkeypatch.setattr(faults, "crash_if", crash_if)
    return crashed


def fail_locally(monkeypatch, mode: str, times: int) -> list[str]:
    """The action's local transaction fails after its gateway call answered and was recorded."""
    if mode != "choreography":
        return crash_at(monkeypatch, FaultRule.CrashPoint.BEFORE_COMMIT, ACTION[mode], times)
    # A choreographed reaction's injected failure comes after its gateway call (payments.react
    # makes the call before the reaction runs): the fault the payments-outage simulation sets.
    if times:
        FaultRule.objects.using("payments").create(service="payments", operation="charge", fail_first=times)
        # `fail_first` also skips the call itself (payments.tasks._call_outside): the
        # simulation's `failure_rate` does not, so the test uses it when the fault never ends.
    else:
        FaultRule.objects.using("payments").create(service="payments", operation="charge", failure_rate=1.0)
    faults.clear_cache()
    return []


def place(alice_api, broker, mode: str) -> Saga:
    receipt = alice_api.post("/api/orders/", {**order_body(), "mode": mode}, format="json").json()
    broker.deliver()
    return Saga.objects.get(id=receipt["saga"]["id"])


def books(saga: Saga) -> dict:
    """The gateway's records and the local rows of the saga's charge, side by side."""
    key = services.idempotency_key(saga.id)
    taken = gateway.find_charge(key)
    charge = Charge.objects.using("payments").get(saga_id=saga.id)
    return {
        "gateway_charge": taken.reference if taken else None,
        "gateway_refund": gateway.find_refund(taken.reference) if taken else None,
        "local_state": charge.state,
        "local_reference": charge.gateway_reference,
        "local_refund": charge.refund_reference,
        "ledger": sorted(
            LedgerEntry.objects.using("payments").filter(charge=charge).values_list("kind", "amount"), key=str
        ),
        "barrier": dict(
            Barrier.objects.using("payments")
            .filter(saga_id=saga.id, step="charge_payment")
            .values_list("op", "outcome__status")
        ),
    }


def expect_kept(saga: Saga, mode: str) -> dict:
    reference = gateway.reference_for(services.idempotency_key(saga.id))
    amount = Charge.objects.using("payments").get(saga_id=saga.id).amount
    return {
        "gateway_charge": reference,
        "gateway_refund": None,
        "local_state": "captured",
        "local_reference": reference,
        "local_refund": None,
        "ledger": [("charge", amount)],
        # TCC: the confirm (capture) has its own row.
        "barrier": {"action": "succeeded", **({"confirm": "succeeded"} if mode == "tcc" else {})},
    }


def expect_returned(saga: Saga, mode: str) -> dict:
    reference = gateway.reference_for(services.idempotency_key(saga.id))
    amount = Charge.objects.using("payments").get(saga_id=saga.id).amount
    returned: dict[str, object]
    if mode == "tcc":  # the hold is released: nothing was taken, nothing to refund
        returned = {"local_state": "voided", "gateway_refund": None, "local_refund": None, "ledger": []}
    else:
        refund = "re_" + reference.removeprefix("ch_")
        returned = {
            "local_state": "refunded",
            "gateway_refund": refund,
            "local_refund": refund,
            "ledger": sorted([("charge", amount), ("refund", -amount)], key=str),
        }
    return {
        "gateway_charge": reference,
        "local_reference": reference,
        # The action's row records the charge the gateway took; its compensation undid it.
        "barrier": {"action": "succeeded", "compensate": "succeeded"},
        **returned,
    }


def took_once(calls: list[tuple[str, str]], saga: Saga) -> None:
    """Every charge call for the saga carried its one key, and at most one refund was made."""
    key = services.idempotency_key(saga.id)
    assert {k for kind, k in calls if kind == "charge"} == {key}
    assert len([c for c in calls if c[0] == "refund"]) <= 1


@pytest.mark.parametrize("mode", MODES)
def test_a_crash_after_the_gateway_answered_then_a_retry_succeeds(
    alice_api, catalogue, broker, gateway_calls, monkeypatch, mode
):
    crashed = crash_at(monkeypatch, FaultRule.CrashPoint.AFTER_CALL, ACTION[mode], times=1)

    saga = place(alice_api, broker, mode)

    assert crashed == [ACTION[mode]]
    assert saga.state == "completed", saga.failure
    assert books(saga) == expect_kept(saga, mode)
    took_once(gateway_calls, saga)
    assert run_audit(gateway=True) == []


@pytest.mark.parametrize("mode", MODES)
def test_a_crash_after_the_gateway_answered_every_time_ends_refunded_once(
    alice_api, catalogue, broker, gateway_calls, monkeypatch, mode
):
    crashed = crash_at(monkeypatch, FaultRule.CrashPoint.AFTER_CALL, ACTION[mode], times=0)

    saga = place(alice_api, broker, mode)

    assert crashed, "the fault never fired"
    assert saga.state == "compensated", saga.failure
    assert saga.failure["code"] == "retries_exhausted"
    assert books(saga) == expect_returned(saga, mode)
    took_once(gateway_calls, saga)
    assert run_audit(gateway=True) == []


@pytest.mark.parametrize("mode", MODES)
def test_a_local_transaction_failing_after_the_gateway_then_a_retry_succeeds(
    alice_api, catalogue, broker, gateway_calls, monkeypatch, mode
):
    fail_locally(monkeypatch, mode, times=1)

    saga = place(alice_api, broker, mode)

    assert saga.state == "completed", saga.failure
    assert books(saga) == expect_kept(saga, mode)
    took_once(gateway_calls, saga)
    assert run_audit(gateway=True) == []


@pytest.mark.parametrize("mode", MODES)
def test_a_local_transaction_failing_after_the_gateway_every_time_ends_refunded_once(
    alice_api, catalogue, broker, gateway_calls, monkeypatch, mode
):
    """The choreographed case is the payments-outage simulation's: the reaction gives up and
    undoes a charge its barrier never recorded. The give-up first reconciles the charge with the
    gateway and stores the action's outcome, and the gateway refund goes out through the outbox,
    after the give-up's commit."""
    fail_locally(monkeypatch, mode, times=0)

    saga = place(alice_api, broker, mode)

    assert saga.state == "compensated", saga.failure
    assert saga.failure["code"] == "retries_exhausted"
    assert books(saga) == expect_returned(saga, mode)
    took_once(gateway_calls, saga)
    assert run_audit(gateway=True) == []


def test_the_give_up_refunds_at_the_gateway_only_after_its_commit(alice_api, catalogue, broker, gateway_calls):
    """The choreographed give-up records the refund and queues the gateway's refund in one
    transaction: the refund is made by the queued message (not inside the transaction), and a
    redelivered message refunds nothing twice."""
    fail_locally(None, "choreography", times=0)
    receipt = alice_api.post("/api/orders/", {**order_body(), "mode": "choreography"}, format="json").json()

    from tests.conftest import deliver_until

    deliver_until(broker, services.REFUND_AT_GATEWAY_TASK)
    charge = Charge.objects.using("payments").get(saga_id=receipt["saga"]["id"])
    assert (charge.state, charge.refund_reference) == ("refunded", None)
    assert [kind for kind, _ in gateway_calls if kind == "refund"] == []
    assert OutboxMessage.objects.using("payments").filter(task=services.REFUND_AT_GATEWAY_TASK).count() == 1

    (queued,) = [m for m in broker.queue if m["task"] == services.REFUND_AT_GATEWAY_TASK]
    broker.deliver()
    broker.run(queued)  # delivered twice

    charge.refresh_from_db(using="payments")
    assert charge.refund_reference == gateway.find_refund(charge.gateway_reference) is not None
    assert [kind for kind, _ in gateway_calls if kind == "refund"] == ["refund"]
    assert Decimal(sum(e.amount for e in charge.entries.all())) == Decimal("0.00")
    assert run_audit(gateway=True) == []


def test_a_compensation_with_nothing_at_the_gateway_stays_null(alice_api, catalogue, broker, gateway_calls):
    """The barrier's semantics are kept: a charge whose every call took nothing (the gateway
    answered "unavailable") is cancelled, and its undo is a null compensation."""
    FaultRule.objects.using("payments").create(service="payments", operation="charge", fail_first=1000)
    faults.clear_cache()

    saga = place(alice_api, broker, "orchestrated")

    assert saga.state == "compensated"
    assert gateway.find_charge(services.idempotency_key(saga.id)) is None
    assert not Charge.objects.using("payments").filter(saga_id=saga.id, state__in=["captured", "refunded"]).exists()
    assert [c for c in gateway_calls if c[0] == "refund"] == []
    assert run_audit(gateway=True) == []
