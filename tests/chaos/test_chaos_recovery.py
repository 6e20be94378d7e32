"""Killed processes, timed: a whole worker killed while it holds a message, and every kill point
of the message path (the orchestrator between its commit and its publish, the outbox relay
between its send and its mark, a service between the gateway call and its commit, and between
its reply and its acknowledgement).

The step leases stay at their 30 s, longer than any of these waits: the recovery must come from
the redelivery mechanism under test, and a lease that had to step in shows as `step_timed_out`."""

from __future__ import annotations

import re
import signal
import time
from decimal import Decimal

import pytest

from orchestration.audit import run_audit
from orchestration.models import SagaEvent, SagaStep
from payments import gateway
from payments.models import Charge
from sagaplatform.kernel import faults
from sagaplatform.kernel.models import FaultRule, OutboxMessage
from sagaplatform.kernel.outbox import SWEEP_GRACE
from shipping.models import Shipment
from tests.chaos.test_chaos import assert_paid_once, inject, place, settled, step_state
from tests.conftest import mug
from tests.processes import wait_for
from tests.stack import PASSWORD, Stack

pytestmark = [pytest.mark.production, pytest.mark.django_db(transaction=True, databases="__all__")]

# This stack's broker: an unacknowledged message comes back after VISIBILITY seconds, looked for
# every RESTORE_INTERVAL; no task may run longer than the hard time limit below it.
VISIBILITY = 8
RESTORE_INTERVAL = 1
HANG = 4


@pytest.fixture(scope="module")
def stack(django_db_setup, django_db_blocker):
    running = Stack("recovery", step_timeout=0, concurrency=4)  # 0: the definitions' own 30 s leases
    running.env.update(
        {
            "CELERY_VISIBILITY_TIMEOUT": str(VISIBILITY),
            "CELERY_UNACKED_RESTORE_INTERVAL": str(RESTORE_INTERVAL),
            "CELERY_TASK_SOFT_TIME_LIMIT": "5",
            "CELERY_TASK_TIME_LIMIT": "6",
            "PAYMENT_GATEWAY_HANG_SECONDS": str(HANG),  # inside the time limits
            # These tests follow a service's command as a Celery message: its delivery, its
            # restore, its redelivery. Commands run inline by the worker that committed them
            # have their own (tests/chaos/test_chaos_batches.py).
            "SAGA_INLINE_COMMANDS": "0",
        }
    )
    running.start()
    yield running
    running.stop()


@pytest.fixture
def customer(django_user_model, catalogue):
    return django_user_model.objects.create_user("recovery", "recovery@example.com", PASSWORD).username


def inject_orchestrator(**rule) -> FaultRule:
    created = FaultRule.objects.using("default").create(service=faults.ORCHESTRATOR, **rule)
    time.sleep(faults.CACHE_SECONDS + 0.2)
    return created


def command_id(saga_id: str, step: str) -> str:
    """The id of the outbox row (and so of the Celery task) carrying the step's first command."""
    row = wait_for(
        lambda: OutboxMessage.objects.using("default").filter(payload__saga_id=saga_id, payload__step=step).first(),
        timeout=20,
        message=f"the {step} command",
    )
    return str(row.id)


def received(stack: Stack, task_id: str) -> int:
    return len(re.findall(rf"\[{task_id}\] received", stack.log("worker0")))


def no_lease_expired(saga_id: str) -> bool:
    return not SagaEvent.objects.filter(saga_id=saga_id, kind="step_timed_out").exists()


def spent(rule: FaultRule) -> bool:
    rule.refresh_from_db()
    return rule.crashes_left == 0


def test_a_killed_workers_message_is_restored_within_the_visibility_timeout(stack, customer):
    """SIGKILL the whole worker (main process and pool) while it runs a charge: nobody is left to
    requeue the message. The restarted worker's restore scan finds it unacknowledged past the
    visibility timeout and runs it again; its second run, live, is not redelivered."""
    inject("payments", operation="charge", hang_seconds=2.5)
    saga_id = place(stack, customer)["saga"]["id"]
    charge = command_id(saga_id, "charge_payment")
    wait_for(lambda: received(stack, charge) == 1, timeout=20, message="the worker to take the charge")
    # Marked published too, or the kill may land between the orchestrator's send and its mark,
    # and the relay would send the charge again on its own.
    wait_for(
        lambda: OutboxMessage.objects.using("default").filter(id=charge, published_at__isnull=False).exists(),
        timeout=5,
        message="the charge command marked published",
    )

    stack.kill("worker0", signal.SIGKILL)
    stack.start_worker(0)

    (saga,) = settled([saga_id], timeout=VISIBILITY + 15)
    assert saga.state == "completed"
    assert no_lease_expired(saga_id)
    assert SagaStep.objects.get(saga_id=saga_id, name="charge_payment").attempts == 1
    # The same message came back (not a new attempt), once: its second run hung 2.5 s too.
    assert received(stack, charge) == 2
    assert_paid_once(saga_id, Decimal("25.00"))
    assert mug() == (48, 0)
    assert run_audit() == []


def test_orchestrator_killed_after_its_commit_then_the_relay_after_its_send(stack, customer):
    """The orchestrator commits the charge command and dies before publishing it; the relay
    sends it and dies before marking it; the next relay sends it again."""
    commit_crash = inject_orchestrator(operation="charge_payment", crash_point="after_commit")
    relay_crash = inject_orchestrator(operation="relay", crash_point="before_commit")
    saga_id = place(stack, customer)["saga"]["id"]

    (saga,) = settled([saga_id], timeout=25)

    assert saga.state == "completed"
    assert spent(commit_crash)
    assert spent(relay_crash)
    log = stack.log("worker0")
    assert "crashing at after_commit of orchestrator.charge_payment" in log
    assert "crashing at before_commit of orchestrator.relay" in log
    # The relay that died had sent the command, so the saga can finish before the next relay
    # (past the grace period) sends it again and marks it.
    charge = wait_for(
        lambda: (
            OutboxMessage.objects.using("default")
            .filter(id=command_id(saga_id, "charge_payment"), published_at__isnull=False)
            .first()
        ),
        timeout=30,
        message="the next relay to send the charge again and mark it",
    )
    assert charge.published_at - charge.created_at >= SWEEP_GRACE  # the relay sent it, not the fast path
    wait_for(lambda: received(stack, charge.id) >= 2, timeout=10, message="the second delivery in the log")
    assert received(stack, charge.id) == 2  # by the relay that died, then by the next one
    assert no_lease_expired(saga_id)
    assert SagaStep.objects.get(saga_id=saga_id, name="charge_payment").attempts == 1
    assert_paid_once(saga_id, Decimal("25.00"))
    assert mug() == (48, 0)
    assert run_audit() == []


def test_service_killed_between_the_gateway_call_and_its_commit_and_after_its_reply(stack, customer):
    """payments dies after the gateway's answer is recorded and before the commit of the step's
    outcome and reply (that transaction rolls back; the recorded charge stays); shipping dies after publishing its reply, before acknowledging the command. Each
    killed task runs again at once, the second shipping run as a barrier replay."""
    gateway_crash = inject("payments", operation="charge", crash_point="before_commit")
    reply_crash = inject("shipping", operation="schedule", crash_point="after_reply")
    saga_id = place(stack, customer)["saga"]["id"]

    (saga,) = settled([saga_id], timeout=20)

    assert saga.state == "completed"
    assert spent(gateway_crash)
    assert spent(reply_crash)
    log = stack.log("worker0")
    assert "crashing at before_commit of payments.charge" in log
    assert "crashing at after_reply of shipping.schedule" in log
    # The reply was out before the crash, so the saga may finish before the killed task's rerun.
    replay = f"barrier replay for {saga_id}/schedule_shipment/action"
    wait_for(lambda: replay in stack.log("worker0"), timeout=15, message="the killed booking to run again")
    assert received(stack, command_id(saga_id, "charge_payment")) == 2
    assert no_lease_expired(saga_id)
    attempts = dict(SagaStep.objects.filter(saga_id=saga_id).values_list("name", "attempts"))
    assert (attempts["charge_payment"], attempts["schedule_shipment"]) == (1, 1)
    assert_paid_once(saga_id, Decimal("25.00"))
    assert Shipment.objects.using("shipping").filter(saga_id=saga_id).count() == 1
    assert mug() == (48, 0)
    assert run_audit() == []


def test_payments_killed_between_the_gateway_call_and_its_record(stack, customer):
    """The gateway took the card and payments dies before recording the answer. The intent (the
    pending charge and its barrier row) committed before the call, so the rerun calls the gateway
    again with the same idempotency key, gets the same charge back, and records it once."""
    crash = inject("payments", operation="charge", crash_point="after_call")
    saga_id = place(stack, customer)["saga"]["id"]

    (saga,) = settled([saga_id], timeout=20)

    assert saga.state == "completed"
    assert spent(crash)
    assert "crashing at after_call of payments.charge" in stack.log("worker0")
    assert received(stack, command_id(saga_id, "charge_payment")) == 2
    assert no_lease_expired(saga_id)
    assert_paid_once(saga_id, Decimal("25.00"))
    charge = Charge.objects.using("payments").get(saga_id=saga_id)
    assert charge.gateway_reference == gateway.reference_for(charge.idempotency_key)
    assert charge.payment_token == ""  # kept only while pending
    assert run_audit() == []


def test_a_hanging_gateway_call_holds_up_no_other_order(stack, customer):
    """PostgreSQL: an order whose gateway call hangs, and a normal one placed meanwhile, which
    completes while the first still waits on the gateway."""
    hanging = place(stack, customer, token="tok_hang")["saga"]["id"]
    wait_for(lambda: step_state(hanging, "charge_payment") == "running", timeout=20, message="the hanging charge")
    started = time.monotonic()
    normal = place(stack, customer)["saga"]["id"]

    (saga,) = settled([normal], timeout=20)
    elapsed = time.monotonic() - started

    assert saga.state == "completed"
    assert elapsed < HANG, f"the normal order took {elapsed:.1f} s, behind a {HANG} s gateway call"
    assert step_state(hanging, "charge_payment") == "running"
    (slow,) = settled([hanging], timeout=20)
    assert slow.state == "completed"
    assert_paid_once(normal, Decimal("25.00"))
    assert_paid_once(hanging, Decimal("25.00"))
    assert run_audit() == []
