"""Leases, timeouts, the saga deadline, parking and operator actions, driven step by step with
the in-test broker (messages can be dropped, held, duplicated; time is moved by rewriting the
stored deadlines and running the sweeper)."""

from __future__ import annotations

import threading
import time
from datetime import timedelta

import pytest
from django.db import connections
from django.utils import timezone

from inventory.models import StockItem
from orchestration import engine, sweeper
from orchestration.exceptions import OperationNotAllowed
from orchestration.models import Alert, Saga, SagaEvent, SagaStep
from orders.models import Order
from payments.models import Charge, LedgerEntry
from sagaplatform.kernel import attempts, faults
from sagaplatform.kernel.models import FaultRule
from shipping.models import Shipment
from tests.conftest import deliver_until, mug, order_body

pytestmark = pytest.mark.django_db(transaction=True, databases="__all__")


def place(api, body=None) -> dict:
    response = api.post("/api/orders/", body or order_body(), format="json")
    assert response.status_code == 202, response.content
    return response.json()


def expire_lease(saga_id, step: str, *, sent_ago: float | None = None) -> None:
    """Expire a step's lease. With `sent_ago`, its command went out that long ago (within the
    queue wait limit, the attempt's mark decides); without, long ago (it simply timed out)."""
    now = timezone.now()
    sent_at = now - timedelta(seconds=sent_ago) if sent_ago is not None else None
    SagaStep.objects.filter(saga_id=saga_id, name=step).update(deadline_at=now - timedelta(seconds=1), sent_at=sent_at)


def step_of(saga_id, name: str) -> SagaStep:
    return SagaStep.objects.get(saga_id=saga_id, name=name)


def kinds(saga_id) -> list[str]:
    return list(SagaEvent.objects.filter(saga_id=saga_id).order_by("seq").values_list("kind", flat=True))


def test_a_lost_reply_times_out_and_the_retry_replays_the_stored_outcome(alice_api, catalogue, broker):
    saga_id = place(alice_api)["saga"]["id"]
    deliver_until(broker, "payments.execute")
    broker.run(broker.queue.pop(0))  # the charge runs and commits...
    lost = broker.take("orchestration.handle_reply")  # ...but its reply is lost
    assert len(lost) == 1
    assert step_of(saga_id, "charge_payment").state == "running"

    expire_lease(saga_id, "charge_payment")
    assert sweeper.sweep_once()["timed_out"] == 1
    broker.deliver()

    step = step_of(saga_id, "charge_payment")
    assert step.attempts == 2
    assert step.state == "succeeded"
    assert "step_timed_out" in kinds(saga_id)
    assert Saga.objects.get(id=saga_id).state == "completed"
    # The second attempt hit the barrier: one charge, one ledger entry.
    assert Charge.objects.using("payments").count() == 1
    assert LedgerEntry.objects.using("payments").count() == 1


def test_a_lost_command_times_out_and_is_sent_again(alice_api, catalogue, broker):
    saga_id = place(alice_api)["saga"]["id"]
    deliver_until(broker, "inventory.execute")
    broker.take("inventory.execute")  # the broker lost it

    expire_lease(saga_id, "reserve_stock")
    sweeper.sweep_once()
    broker.deliver()

    assert Saga.objects.get(id=saga_id).state == "completed"
    assert step_of(saga_id, "reserve_stock").attempts == 2
    item = StockItem.objects.using("inventory").get(sku="SKU-MUG")
    assert (item.on_hand, item.reserved) == (48, 0)


def test_the_sweeper_ignores_a_lease_that_has_not_expired(alice_api, catalogue, broker):
    saga_id = place(alice_api)["saga"]["id"]
    deliver_until(broker, "inventory.execute")
    assert sweeper.sweep_once()["timed_out"] == 0
    assert step_of(saga_id, "reserve_stock").attempts == 1


def test_a_step_that_keeps_hanging_times_out_retries_then_compensates(alice_api, catalogue, broker):
    """Every attempt of the shipment booking is lost in a hang: after max attempts the saga
    compensates what came before, and a late effect of the hung attempt is refused."""
    saga_id = place(alice_api)["saga"]["id"]
    for _attempt in range(5):
        deliver_until(broker, "shipping.execute")
        assert broker.take("shipping.execute"), "a new attempt was sent"
        expire_lease(saga_id, "schedule_shipment")
        sweeper.sweep_once()
        deliver_until(broker, "shipping.execute")
        # A retry scheduled with backoff is due at once here: its lease is what matters.
    broker.deliver()

    saga = Saga.objects.get(id=saga_id)
    assert saga.state == "compensated"
    assert saga.failure["code"] == "retries_exhausted"
    assert step_of(saga_id, "schedule_shipment").state == "compensated"  # null compensation
    assert kinds(saga_id).count("step_timed_out") == 5
    assert Charge.objects.using("payments").get().state == "refunded"
    assert StockItem.objects.using("inventory").get(sku="SKU-MUG").reserved == 0
    assert not Shipment.objects.using("shipping").exists()
    assert Order.objects.using("orders").get(saga_id=saga_id).status == "rejected"


def test_saga_deadline_before_the_pivot_compensates(alice_api, catalogue, broker):
    saga_id = place(alice_api)["saga"]["id"]
    deliver_until(broker, "orders.execute")  # reserved and charged; approval in flight
    Saga.objects.filter(id=saga_id).update(deadline_at=timezone.now() - timedelta(seconds=1))

    assert sweeper.sweep_once()["deadlines"] == 1
    broker.deliver()  # the approval arrives late; the expired lease times it out
    sweeper.sweep_once()
    broker.deliver()

    saga = Saga.objects.get(id=saga_id)
    assert saga.state == "compensated"
    assert saga.failure["code"] == "deadline_exceeded"
    assert Charge.objects.using("payments").get().state == "refunded"
    assert StockItem.objects.using("inventory").get(sku="SKU-MUG").reserved == 0
    order = Order.objects.using("orders").get(saga_id=saga_id)
    assert (order.status, order.failure_code) == ("rejected", "deadline_exceeded")


def test_saga_deadline_after_the_pivot_goes_forward(alice_api, catalogue, broker):
    saga_id = place(alice_api)["saga"]["id"]
    deliver_until(broker, "notifications.execute")  # parcel dispatched: past the pivot
    assert Saga.objects.get(id=saga_id).deadline_at is None  # the pivot cleared it
    Saga.objects.filter(id=saga_id).update(deadline_at=timezone.now() - timedelta(seconds=1))

    sweeper.sweep_once()
    broker.deliver()

    assert Saga.objects.get(id=saga_id).state == "completed"
    assert "deadline_passed_after_pivot" in kinds(saga_id)
    assert Shipment.objects.using("shipping").get().state == "dispatched"


def test_a_failure_after_the_pivot_parks_instead_of_compensating(alice_api, catalogue, broker, admin_user):
    inject("notifications", operation="send_confirmation", fail_first=10)
    saga_id = place(alice_api)["saga"]["id"]
    broker.deliver()

    saga = Saga.objects.get(id=saga_id)
    assert saga.state == "parked"
    assert step_of(saga_id, "notify_customer").state == "failed"
    assert Shipment.objects.using("shipping").get().state == "dispatched"  # nothing undone
    assert Alert.objects.get(saga=saga).resolved_at is None

    FaultRule.objects.using("notifications").all().delete()
    _clear_fault_cache()
    engine.saga_retry(saga_id=saga_id, actor="user:admin", reason="mail relay fixed")
    broker.deliver()

    assert Saga.objects.get(id=saga_id).state == "completed"
    assert Alert.objects.get(saga=saga).resolved_by == "user:admin"


def _clear_fault_cache():
    faults.clear_cache()


def inject(service: str, **rule) -> FaultRule:
    created = FaultRule.objects.using(service).create(service=service, **rule)
    faults.clear_cache()
    return created


@pytest.fixture
def refund_always_fails():
    rule = inject("payments", operation="refund", failure_rate=1.0)
    yield rule
    _clear_fault_cache()


def park_by_failing_refund(api, broker) -> str:
    saga_id = place(api, order_body())["saga"]["id"]
    # Shipping refuses for good, so the saga compensates; the refund then keeps failing.
    inject("shipping", operation="schedule", fail_first=99)
    broker.deliver()
    return saga_id


def test_a_compensation_that_keeps_failing_parks_the_saga_and_alerts(alice_api, catalogue, broker, refund_always_fails):
    saga_id = park_by_failing_refund(alice_api, broker)

    saga = Saga.objects.get(id=saga_id)
    assert saga.state == "parked"
    step = step_of(saga_id, "charge_payment")
    assert step.state == "compensation_failed"
    assert step.compensation_attempts == 10  # the compensation policy's max_attempts
    assert kinds(saga_id).count("compensation_retry_scheduled") == 9
    alert = Alert.objects.get(saga=saga)
    assert "charge_payment" in alert.message
    # Nothing was refunded, and the reservation (below the parked step) is still held.
    assert Charge.objects.using("payments").get().state == "captured"
    assert StockItem.objects.using("inventory").get(sku="SKU-MUG").reserved == 2


def test_operator_retry_of_a_parked_compensation_completes_it(
    alice_api, catalogue, broker, refund_always_fails, admin_api
):
    saga_id = park_by_failing_refund(alice_api, broker)
    refund_always_fails.delete()
    _clear_fault_cache()

    response = admin_api.post(f"/api/sagas/{saga_id}/retry/", {"reason": "gateway back up"}, format="json")
    assert response.status_code == 202, response.content
    broker.deliver()

    assert Saga.objects.get(id=saga_id).state == "compensated"
    assert Charge.objects.using("payments").get().state == "refunded"
    assert StockItem.objects.using("inventory").get(sku="SKU-MUG").reserved == 0
    retry = SagaEvent.objects.get(saga_id=saga_id, kind="operator_retry")
    assert (retry.actor, retry.data["reason"]) == ("user:admin", "gateway back up")
    assert Alert.objects.get(saga_id=saga_id).resolved_by == "user:admin"


def test_operator_skip_records_the_reason_and_finishes_compensating(
    alice_api, catalogue, broker, refund_always_fails, admin_api
):
    saga_id = park_by_failing_refund(alice_api, broker)

    refused = admin_api.post(f"/api/sagas/{saga_id}/skip/", {"step": "charge_payment", "reason": ""}, format="json")
    assert refused.status_code == 400
    wrong = admin_api.post(f"/api/sagas/{saga_id}/skip/", {"step": "reserve_stock", "reason": "x"}, format="json")
    assert wrong.status_code == 409
    assert wrong.json()["code"] == "nothing_to_skip"

    response = admin_api.post(
        f"/api/sagas/{saga_id}/skip/",
        {"step": "charge_payment", "reason": "refunded by hand, ticket 42"},
        format="json",
    )
    assert response.status_code == 202, response.content
    broker.deliver()

    assert Saga.objects.get(id=saga_id).state == "compensated"
    assert step_of(saga_id, "charge_payment").state == "skipped"
    skip = SagaEvent.objects.get(saga_id=saga_id, kind="compensation_skipped")
    assert (skip.actor, skip.data["reason"]) == ("user:admin", "refunded by hand, ticket 42")
    assert StockItem.objects.using("inventory").get(sku="SKU-MUG").reserved == 0  # the rest was undone


def test_retry_of_a_saga_that_is_not_stuck_is_refused(alice_api, catalogue, broker, admin_api):
    saga_id = place(alice_api)["saga"]["id"]
    broker.deliver()
    response = admin_api.post(f"/api/sagas/{saga_id}/retry/", {}, format="json")
    assert response.status_code == 409
    assert response.json()["code"] == "saga_not_retryable"
    assert (
        admin_api.post("/api/sagas/00000000-0000-0000-0000-000000000000/retry/", {}, format="json").status_code == 404
    )


def test_saga_operations_are_for_staff_only(alice_api, catalogue, broker):
    saga_id = place(alice_api)["saga"]["id"]
    for path in ("/api/sagas/", f"/api/sagas/{saga_id}/"):
        assert alice_api.get(path).status_code == 403
    assert alice_api.post(f"/api/sagas/{saga_id}/retry/", {}, format="json").status_code == 403
    assert not SagaEvent.objects.filter(saga_id=saga_id, kind="operator_retry").exists()


@pytest.mark.postgres
def test_concurrent_operator_retries_run_once(alice_api, catalogue, broker, refund_always_fails):
    saga_id = park_by_failing_refund(alice_api, broker)
    refund_always_fails.delete()
    _clear_fault_cache()
    start = threading.Barrier(8)
    results: list[str] = []

    def retry(i: int) -> None:
        try:
            start.wait()
            engine.saga_retry(saga_id=saga_id, actor=f"user:op{i}", reason="race")
            results.append("ok")
        except OperationNotAllowed as exc:
            results.append(exc.code)
        finally:
            connections.close_all()

    threads = [threading.Thread(target=retry, args=(i,)) for i in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    assert results.count("ok") == 1
    assert len(results) == 8
    assert SagaEvent.objects.filter(saga_id=saga_id, kind="operator_retry").count() == 1
    assert len(broker.take("payments.execute")) == 1  # one refund command sent


@pytest.fixture
def admin_api(admin_user):
    from rest_framework.test import APIClient

    client = APIClient()
    client.force_authenticate(admin_user)
    return client


def test_admin_retry_asks_for_a_reason_and_records_it(alice_api, catalogue, broker, refund_always_fails, admin_client):
    saga_id = park_by_failing_refund(alice_api, broker)
    refund_always_fails.delete()
    faults.clear_cache()
    url = "/admin/orchestration/saga/"
    form = {"action": "retry_sagas", "_selected_action": [saga_id]}

    asked = admin_client.post(url, form)
    assert asked.status_code == 200
    assert b"reason" in asked.content
    assert Saga.objects.get(id=saga_id).state == "parked"  # nothing happens without a reason

    done = admin_client.post(url, {**form, "apply": "1", "reason": "refund gateway repaired"})
    assert done.status_code == 302
    broker.deliver()

    assert Saga.objects.get(id=saga_id).state == "compensated"
    retry = SagaEvent.objects.get(saga_id=saga_id, kind="operator_retry")
    assert (retry.actor, retry.data["reason"]) == ("user:admin", "refund gateway repaired")


def test_admin_skip_settles_the_parked_compensation(alice_api, catalogue, broker, refund_always_fails, admin_client):
    saga_id = park_by_failing_refund(alice_api, broker)
    form = {
        "action": "skip_parked_compensations",
        "_selected_action": [saga_id],
        "apply": "1",
        "reason": "manual refund",
    }

    assert admin_client.post("/admin/orchestration/saga/", form).status_code == 302
    broker.deliver()

    assert Saga.objects.get(id=saga_id).state == "compensated"
    assert SagaEvent.objects.get(saga_id=saga_id, kind="compensation_skipped").data["reason"] == "manual refund"


def test_a_saga_the_engine_fails_on_is_parked_and_the_sweep_goes_on(alice_api, catalogue, broker, settings):
    """A saga whose definition is gone used to abort every sweep at its row, so no other saga's
    lease, deadline or handling window was handled. Each saga is swept on its own now."""
    settings.SHIPPING_HANDLING_SECONDS = 3600
    waiting = place(alice_api)["saga"]["id"]
    broker.deliver()  # booked; the dispatch waits out the handling window
    broken = place(alice_api)["saga"]["id"]
    deliver_until(broker, "payments.execute")
    broker.take("payments.execute")
    # A definition gone from the code still runs from its stored snapshot; a version found
    # neither there nor among the snapshots cannot run.
    Saga.objects.filter(id=broken).update(definition="no_longer_defined", definition_hash="0" * 64)
    expire_lease(broken, "charge_payment")  # the first row the sweep meets
    SagaStep.objects.filter(saga_id=waiting, name="dispatch_shipment").update(
        next_attempt_at=timezone.now() - timedelta(seconds=1)
    )

    result = sweeper.sweep_once()
    broker.deliver()

    assert (result["parked"], result["started"]) == (1, 1)
    assert Saga.objects.get(id=waiting).state == "completed"
    assert Saga.objects.get(id=broken).state == "parked"
    alert = Alert.objects.get(saga_id=broken, resolved_at__isnull=True)
    assert "no_longer_defined" in alert.message
    assert kinds(broken)[-1] == "saga_parked"
    # Parked, it is left out: later sweeps neither fail on it nor park it again.
    assert sweeper.sweep_once()["parked"] == 0
    assert Alert.objects.filter(saga_id=broken).count() == 1


# --- Leases run from the start of an attempt (a queued command or answer is not late) -----------


@pytest.fixture
def queues(monkeypatch) -> dict:
    """The broker's queue depths as the sweeper sees them (idle unless a test fills them)."""
    depths: dict = {}
    monkeypatch.setattr(sweeper, "queue_depths", lambda: depths, raising=False)
    return depths


def plant_mark(saga_id, step: str, *, state: str, age: float, op: str = "action", attempt: int = 1) -> None:
    """A worker's mark for an attempt that started `age` seconds ago."""
    key = attempts.key(saga_id, step, op, attempt)
    store = attempts._store()
    if isinstance(store, attempts._Memory):
        store.marks[key] = (state, time.monotonic() - age)
    else:
        store.set(key, state, px=int(attempts.TTL_MS - age * 1000))


def test_a_command_still_queued_when_its_lease_expires_is_not_counted(alice_api, catalogue, broker, queues):
    saga_id = place(alice_api)["saga"]["id"]
    deliver_until(broker, "inventory.execute")
    queued = broker.take("inventory.execute")  # still waiting behind a backlog
    queues["inventory"] = 40
    expire_lease(saga_id, "reserve_stock", sent_ago=12)

    sweeper.sweep_once()

    assert broker.queue == []  # nothing sent again: it is still in the queue
    step = step_of(saga_id, "reserve_stock")
    assert (step.state, step.attempts) == ("running", 1)
    assert step.deadline_at > timezone.now()
    extended = SagaEvent.objects.get(saga_id=saga_id, kind="lease_extended")
    assert (extended.data["reason"], extended.data["resent"]) == ("queued", False)
    broker.queue.extend(queued)  # its turn comes
    broker.deliver()
    assert Saga.objects.get(id=saga_id).state == "completed"
    assert "step_timed_out" not in kinds(saga_id)
    assert step_of(saga_id, "reserve_stock").attempts == 1


def test_a_lost_command_is_sent_again_as_the_same_attempt(alice_api, catalogue, broker, queues):
    saga_id = place(alice_api)["saga"]["id"]
    deliver_until(broker, "inventory.execute")
    broker.take("inventory.execute")  # the broker lost it; nothing is queued ahead of it
    expire_lease(saga_id, "reserve_stock", sent_ago=12)

    sweeper.sweep_once()

    [again] = broker.take("inventory.execute")
    assert again["payload"]["attempt"] == 1
    broker.run(again)
    broker.deliver()
    assert Saga.objects.get(id=saga_id).state == "completed"
    assert "step_timed_out" not in kinds(saga_id)
    assert step_of(saga_id, "reserve_stock").attempts == 1
    assert mug() == (48, 0)


def test_a_lost_answer_is_asked_for_again_and_replayed(alice_api, catalogue, broker, queues):
    saga_id = place(alice_api)["saga"]["id"]
    deliver_until(broker, "payments.execute")
    broker.run(broker.queue.pop(0))  # the charge commits...
    assert broker.take("orchestration.handle_reply")  # ...and its answer is lost
    expire_lease(saga_id, "charge_payment", sent_ago=12)

    sweeper.sweep_once()
    broker.deliver()

    assert SagaEvent.objects.get(saga_id=saga_id, kind="lease_extended").data["reason"] == "answer_queued"
    assert Saga.objects.get(id=saga_id).state == "completed"
    assert step_of(saga_id, "charge_payment").attempts == 1
    assert Charge.objects.using("payments").count() == 1
    assert LedgerEntry.objects.using("payments").count() == 1


def test_a_started_attempt_gets_its_whole_timeout_from_its_start_and_no_more(alice_api, catalogue, broker, queues):
    saga_id = place(alice_api)["saga"]["id"]
    deliver_until(broker, "payments.execute")
    broker.take("payments.execute")  # a worker holds it, running
    timeout = engine.get_definition("place_order").step("charge_payment").effective_timeout()
    plant_mark(saga_id, "charge_payment", state=attempts.STARTED, age=timeout - 10)  # queued a while, then started
    expire_lease(saga_id, "charge_payment", sent_ago=timeout + 5)

    sweeper.sweep_once()

    step = step_of(saga_id, "charge_payment")
    assert step.attempts == 1
    left = (step.deadline_at - timezone.now()).total_seconds()
    assert 8 < left <= 10  # what is left of its timeout, counted from its start
    assert "step_timed_out" not in kinds(saga_id)

    plant_mark(saga_id, "charge_payment", state=attempts.STARTED, age=timeout + 1)  # a hang
    expire_lease(saga_id, "charge_payment", sent_ago=timeout + 15)
    sweeper.sweep_once()
    assert kinds(saga_id).count("step_timed_out") == 1
    assert step_of(saga_id, "charge_payment").attempts == 2


def test_a_command_that_never_starts_times_out_past_the_queue_wait_limit(
    alice_api, catalogue, broker, queues, settings
):
    settings.SAGA_QUEUE_WAIT_LIMIT = 60
    saga_id = place(alice_api)["saga"]["id"]
    deliver_until(broker, "inventory.execute")
    broker.take("inventory.execute")
    queues["inventory"] = 5  # a queue that never reaches it (no worker for it)
    expire_lease(saga_id, "reserve_stock", sent_ago=61)

    sweeper.sweep_once()

    assert kinds(saga_id).count("step_timed_out") == 1
    assert step_of(saga_id, "reserve_stock").attempts == 2
