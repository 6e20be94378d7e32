"""The django-fsm-2 state machines of Saga, SagaStep and Order: what may follow what."""

from __future__ import annotations

import uuid
from datetime import timedelta
from decimal import Decimal

import pytest
from django.utils import timezone
from django_fsm import TransitionNotAllowed, can_proceed

from orchestration.models import Saga, SagaStep
from orders import services as order_services
from orders.exceptions import OrderNotInState
from orders.models import Order, OrderStatusChange
from tests.conftest import ADDRESS

pytestmark = pytest.mark.django_db(databases="__all__")

FAILURE = {"code": "card_declined", "message": "The card was declined"}
ERROR = {"code": "gateway_unavailable", "message": "Gateway timeout"}


def available(instance, field: str = "state") -> set[str]:
    return {t.name for t in getattr(instance, f"get_available_{field}_transitions")()}


# --- Saga --------------------------------------------------------------------------------------


def new_saga() -> Saga:
    return Saga.objects.create(definition="place_order", context={"order_id": str(uuid.uuid4())})


def saga_in(state: str) -> Saga:
    """A saved saga brought to `state` through its transitions only."""
    saga = new_saga()
    path = {
        "pending": [],
        "running": [saga.start],
        "completed": [saga.start, saga.complete],
        "compensating": [saga.start, lambda: saga.begin_compensation(failure=FAILURE)],
        "compensated": [saga.start, lambda: saga.begin_compensation(failure=FAILURE), saga.finish_compensation],
        "parked": [saga.start, lambda: saga.begin_compensation(failure=FAILURE), saga.park],
        "failed": [lambda: saga.fail(failure=FAILURE)],
    }[state]
    for step in path:
        step()
    saga.save()
    return saga


SAGA_TRANSITIONS = {
    # state: transitions allowed from it
    "pending": {"start", "fail"},
    "running": {"complete", "begin_compensation", "begin_confirm", "park", "fail"},
    "compensating": {"finish_compensation", "finish_cancellation", "abort_cancellation", "park", "fail"},
    "parked": {"resume_forward", "resume_compensation", "resume_confirm"},  # an operator decides
    "completed": set(),
    "compensated": set(),
    "failed": set(),
}


def test_a_new_saga_is_pending():
    saga = new_saga()

    assert Saga.objects.get(id=saga.id).state == Saga.State.PENDING
    assert saga.version == 0
    assert not saga.is_terminal


def test_a_saga_runs_to_completion():
    saga = new_saga()

    saga.start()
    saga.save()
    saga.complete()
    saga.save()

    assert Saga.objects.get(id=saga.id).state == Saga.State.COMPLETED
    assert saga.is_terminal


def test_a_failing_saga_compensates_and_records_why():
    saga = saga_in("running")

    saga.begin_compensation(failure=FAILURE)
    saga.save()

    stored = Saga.objects.get(id=saga.id)
    assert (stored.state, stored.failure) == (Saga.State.COMPENSATING, FAILURE)
    assert not stored.is_terminal

    saga.finish_compensation()
    saga.save()

    assert Saga.objects.get(id=saga.id).state == Saga.State.COMPENSATED


def test_a_compensation_that_cannot_finish_parks_the_saga_which_is_not_terminal():
    saga = saga_in("compensating")

    saga.park()
    saga.save()

    assert Saga.objects.get(id=saga.id).state == Saga.State.PARKED
    assert not saga.is_terminal  # a person must look at it


def test_a_step_failing_after_the_pivot_parks_a_running_saga():
    saga = saga_in("running")

    saga.park()
    saga.save()

    assert Saga.objects.get(id=saga.id).state == Saga.State.PARKED


@pytest.mark.parametrize(
    ("resume", "expected"),
    [("resume_forward", Saga.State.RUNNING), ("resume_compensation", Saga.State.COMPENSATING)],
)
def test_an_operator_resumes_a_parked_saga(resume, expected):
    saga = saga_in("parked")

    getattr(saga, resume)()
    saga.save()

    assert Saga.objects.get(id=saga.id).state == expected


@pytest.mark.parametrize("state", ["pending", "running", "compensating"])
def test_a_saga_can_fail_from_any_live_state(state):
    saga = saga_in(state)

    saga.fail(failure={"code": "definition_missing", "message": "gone"})
    saga.save()

    stored = Saga.objects.get(id=saga.id)
    assert stored.state == Saga.State.FAILED
    assert stored.failure == {"code": "definition_missing", "message": "gone"}


@pytest.mark.parametrize("state", SAGA_TRANSITIONS)
def test_each_saga_state_offers_exactly_its_transitions(state):
    assert available(saga_in(state)) == SAGA_TRANSITIONS[state]


@pytest.mark.parametrize(
    ("state", "transition", "kwargs"),
    [
        ("pending", "complete", {}),
        ("pending", "begin_compensation", {"failure": FAILURE}),
        ("running", "start", {}),
        ("running", "finish_compensation", {}),
        ("running", "resume_forward", {}),
        ("pending", "park", {}),
        ("compensating", "complete", {}),
        ("compensating", "start", {}),
        ("completed", "begin_compensation", {"failure": FAILURE}),
        ("completed", "fail", {"failure": FAILURE}),
        ("completed", "start", {}),
        ("compensated", "start", {}),
        ("compensated", "fail", {"failure": FAILURE}),
        ("failed", "start", {}),
        ("parked", "complete", {}),
        ("parked", "finish_compensation", {}),
        ("parked", "fail", {"failure": FAILURE}),
        ("completed", "resume_compensation", {}),
        ("compensated", "park", {}),
    ],
)
def test_a_saga_refuses_a_transition_from_the_wrong_state(state, transition, kwargs):
    saga = saga_in(state)
    failure_before = saga.failure

    with pytest.raises(TransitionNotAllowed):
        getattr(saga, transition)(**kwargs)

    assert saga.state == state
    assert saga.failure == failure_before  # the refused transition's body did not run
    saga.refresh_from_db()
    assert saga.state == state


def test_the_saga_state_cannot_be_assigned_directly():
    saga = saga_in("running")

    with pytest.raises(AttributeError):
        saga.state = Saga.State.COMPLETED

    assert saga.state == Saga.State.RUNNING
    with pytest.raises(AttributeError):
        Saga(definition="place_order").state = Saga.State.COMPLETED


def test_refresh_from_db_reloads_a_protected_state():
    saga = saga_in("running")
    Saga.objects.filter(id=saga.id).update(state=Saga.State.COMPLETED)  # another worker finished it

    saga.refresh_from_db()

    assert saga.state == Saga.State.COMPLETED
    assert not can_proceed(saga.complete)
    with pytest.raises(AttributeError):  # still protected after the refresh
        saga.state = Saga.State.RUNNING


# --- SagaStep ----------------------------------------------------------------------------------


def new_step(state: str = "pending") -> SagaStep:
    step = SagaStep.objects.create(saga=new_saga(), name="charge_payment", position=1, service="payments")
    path = {
        "pending": [],
        "running": [step.dispatch],
        "retrying": [step.dispatch, lambda: step.schedule_retry(error=ERROR, next_attempt_at=timezone.now())],
        "succeeded": [step.dispatch, lambda: step.succeed(result={"charge_id": "c1"})],
        "failed": [step.dispatch, lambda: step.fail(error=FAILURE)],
        "compensating": [step.dispatch, lambda: step.succeed(result={}), step.begin_compensation],
        "compensated": [
            step.dispatch,
            lambda: step.succeed(result={}),
            step.begin_compensation,
            step.finish_compensation,
        ],
        "compensation_failed": [
            step.dispatch,
            lambda: step.succeed(result={}),
            step.begin_compensation,
            lambda: step.give_up_compensation(error=ERROR),
        ],
        "skipped": [
            step.dispatch,
            lambda: step.succeed(result={}),
            step.begin_compensation,
            lambda: step.give_up_compensation(error=ERROR),
            step.skip_compensation,
        ],
    }[state]
    for transition in path:
        transition()
    step.save()
    return step


STEP_TRANSITIONS = {
    "pending": {"dispatch"},
    # A TCC try still in flight can be cancelled at once (begin_compensation).
    "running": {"schedule_retry", "succeed", "fail", "retry_now", "begin_compensation"},
    "retrying": {"schedule_retry", "succeed", "fail", "retry_now", "begin_compensation"},
    "succeeded": {"begin_compensation", "begin_confirm"},
    "failed": {"begin_compensation", "retry_now"},
    "compensating": {"schedule_compensation_retry", "finish_compensation", "give_up_compensation"},
    "compensated": set(),
    "compensation_failed": {"retry_compensation", "skip_compensation"},  # an operator decides
    "skipped": set(),
}


@pytest.mark.parametrize("state", STEP_TRANSITIONS)
def test_each_step_state_offers_exactly_its_transitions(state):
    assert available(new_step(state)) == STEP_TRANSITIONS[state]


def test_a_step_is_dispatched_retried_and_succeeds_counting_attempts():
    step = new_step()
    later = timezone.now() + timedelta(seconds=5)

    step.dispatch()
    assert (step.state, step.attempts) == ("running", 1)
    step.schedule_retry(error=ERROR, next_attempt_at=later)
    assert (step.state, step.attempts, step.error, step.next_attempt_at) == ("retrying", 2, ERROR, later)
    step.schedule_retry(error=ERROR, next_attempt_at=later)
    step.succeed(result={"charge_id": "c1"})
    step.save()

    stored = SagaStep.objects.get(id=step.id)
    assert (stored.state, stored.attempts, stored.result) == ("succeeded", 3, {"charge_id": "c1"})
    assert stored.next_attempt_at is None


def test_a_failed_step_can_still_be_compensated():
    """Its last attempt's fate may be unknown; the barrier makes the compensation safe."""
    step = new_step("failed")

    step.begin_compensation()
    step.schedule_compensation_retry(error=ERROR, next_attempt_at=timezone.now())
    step.finish_compensation()
    step.save()

    stored = SagaStep.objects.get(id=step.id)
    assert (stored.state, stored.compensation_attempts, stored.next_attempt_at) == ("compensated", 2, None)


def test_a_compensation_that_keeps_failing_is_given_up():
    step = new_step("compensating")

    step.give_up_compensation(error=ERROR)
    step.save()

    stored = SagaStep.objects.get(id=step.id)
    assert (stored.state, stored.error, stored.next_attempt_at) == ("compensation_failed", ERROR, None)


@pytest.mark.parametrize("state", ["running", "retrying", "failed"])
def test_an_operator_retries_a_stuck_or_failed_step_at_once(state):
    step = new_step(state)
    attempts = step.attempts

    step.retry_now()
    step.save()

    stored = SagaStep.objects.get(id=step.id)
    assert (stored.state, stored.attempts, stored.next_attempt_at) == ("running", attempts + 1, None)


def test_an_operator_retries_a_given_up_compensation():
    step = new_step("compensation_failed")

    step.retry_compensation()
    step.save()

    stored = SagaStep.objects.get(id=step.id)
    assert (stored.state, stored.compensation_attempts, stored.next_attempt_at) == ("compensating", 2, None)


def test_an_operator_skips_a_given_up_compensation():
    step = new_step("compensation_failed")

    step.skip_compensation()
    step.save()

    assert SagaStep.objects.get(id=step.id).state == SagaStep.State.SKIPPED


@pytest.mark.parametrize(
    ("state", "transition", "kwargs"),
    [
        ("pending", "succeed", {"result": {}}),
        ("pending", "retry_now", {}),
        ("succeeded", "retry_now", {}),
        ("compensating", "retry_now", {}),
        ("compensating", "skip_compensation", {}),
        ("compensated", "retry_compensation", {}),
        ("skipped", "retry_compensation", {}),
        ("skipped", "begin_compensation", {}),
        ("pending", "fail", {"error": ERROR}),
        ("pending", "begin_compensation", {}),
        ("running", "dispatch", {}),
        ("running", "finish_compensation", {}),
        ("succeeded", "dispatch", {}),
        ("succeeded", "succeed", {"result": {}}),
        ("succeeded", "schedule_retry", {"error": ERROR, "next_attempt_at": None}),
        ("failed", "succeed", {"result": {}}),
        ("compensating", "succeed", {"result": {}}),
        ("compensating", "begin_compensation", {}),
        ("compensated", "begin_compensation", {}),
        ("compensated", "dispatch", {}),
        ("compensation_failed", "finish_compensation", {}),
    ],
)
def test_a_step_refuses_a_transition_from_the_wrong_state(state, transition, kwargs):
    step = new_step(state)
    before = (step.attempts, step.compensation_attempts, step.result, step.error)

    with pytest.raises(TransitionNotAllowed):
        getattr(step, transition)(**kwargs)

    assert step.state == state
    assert (step.attempts, step.compensation_attempts, step.result, step.error) == before


def test_the_step_state_cannot_be_assigned_directly_but_can_be_refreshed():
    step = new_step("running")

    with pytest.raises(AttributeError):
        step.state = SagaStep.State.SUCCEEDED
    SagaStep.objects.filter(id=step.id).update(state=SagaStep.State.SUCCEEDED)
    step.refresh_from_db()

    assert step.state == SagaStep.State.SUCCEEDED
    assert available(step) == {"begin_compensation", "begin_confirm"}


# --- Order -------------------------------------------------------------------------------------


def new_order() -> Order:
    return Order.objects.using("orders").create(customer_id=1, total=Decimal("25.00"), shipping_address=ADDRESS)


def order_in(state: str) -> Order:
    order = new_order()
    if state in ("approved", "shipped"):
        order.approve()
    if state == "shipped":
        order.ship()
    elif state == "rejected":
        order.reject(code="card_declined", message="The card was declined")
    elif state == "cancelled":
        order.cancel(message="changed my mind")
    order.save()
    return order


ORDER_TRANSITIONS = {
    "pending": {"approve", "reject", "cancel"},
    "approved": {"revoke", "ship"},
    "shipped": set(),
    "rejected": set(),
    "cancelled": set(),
}


@pytest.mark.parametrize("state", ORDER_TRANSITIONS)
def test_each_order_status_offers_exactly_its_transitions(state):
    assert available(order_in(state), "status") == ORDER_TRANSITIONS[state]


def test_an_order_is_approved_revoked_and_then_rejected():
    order = new_order()

    order.approve()
    order.save()
    assert Order.objects.using("orders").get(id=order.id).status == Order.Status.APPROVED
    order.revoke()
    order.save()
    assert Order.objects.using("orders").get(id=order.id).status == Order.Status.PENDING
    order.reject(code="address_unserviceable", message="No carrier serves this address")
    order.save()

    stored = Order.objects.using("orders").get(id=order.id)
    assert stored.status == Order.Status.REJECTED
    assert (stored.failure_code, stored.failure_message) == ("address_unserviceable", "No carrier serves this address")


def test_rejecting_truncates_the_reason_to_fit_its_columns():
    order = new_order()

    order.reject(code="c" * 100, message="m" * 1000)
    order.save()

    stored = Order.objects.using("orders").get(id=order.id)
    assert (stored.failure_code, stored.failure_message) == ("c" * 64, "m" * 500)


@pytest.mark.parametrize(
    ("state", "transition", "kwargs"),
    [
        ("pending", "revoke", {}),
        ("approved", "approve", {}),
        ("approved", "reject", {"code": "x", "message": "y"}),
        ("rejected", "approve", {}),
        ("rejected", "revoke", {}),
        ("rejected", "reject", {"code": "x", "message": "y"}),
    ],
)
def test_an_order_refuses_a_transition_from_the_wrong_state(state, transition, kwargs):
    order = order_in(state)
    failure_before = (order.failure_code, order.failure_message)

    with pytest.raises(TransitionNotAllowed):
        getattr(order, transition)(**kwargs)

    assert order.status == state
    assert (order.failure_code, order.failure_message) == failure_before
    order.refresh_from_db()
    assert order.status == state


def test_the_order_status_cannot_be_assigned_directly_but_can_be_refreshed():
    order = order_in("pending")

    with pytest.raises(AttributeError):
        order.status = Order.Status.APPROVED
    assert Order.objects.using("orders").get(id=order.id).status == Order.Status.PENDING

    Order.objects.using("orders").filter(id=order.id).update(status=Order.Status.APPROVED)
    order.refresh_from_db()

    assert order.status == Order.Status.APPROVED
    assert available(order, "status") == {"revoke", "ship"}


# --- the order services drive the machine and keep its history ------------------------------------


def history(order: Order) -> list[tuple[str, str]]:
    return list(OrderStatusChange.objects.using("orders").filter(order=order).values_list("from_status", "to_status"))


def test_approving_twice_approves_once():
    order = new_order()

    order_services.order_approve(order_id=order.id)
    again = order_services.order_approve(order_id=order.id)

    assert again.status == Order.Status.APPROVED
    assert history(order) == [("pending", "approved")]


def test_approving_a_rejected_order_is_refused_and_changes_nothing():
    order = new_order()
    order_services.order_reject(order_id=order.id, code="card_declined", message="The card was declined")

    with pytest.raises(OrderNotInState) as refused:
        order_services.order_approve(order_id=order.id)

    assert refused.value.details == {"status": "rejected"}
    order.refresh_from_db()
    assert order.status == Order.Status.REJECTED
    assert history(order) == [("pending", "rejected")]


def test_revoke_and_reject_only_act_from_their_source_state():
    approved, pending = new_order(), new_order()
    order_services.order_approve(order_id=approved.id)

    order_services.order_reject(order_id=approved.id, code="x", message="y")  # not pending: nothing
    order_services.order_revoke(order_id=pending.id)  # not approved: nothing

    approved.refresh_from_db()
    pending.refresh_from_db()
    assert (approved.status, approved.failure_code) == ("approved", "")
    assert pending.status == "pending"
    assert history(approved) == [("pending", "approved")]
    assert history(pending) == []


def test_a_tcc_step_confirms_retrying_until_it_succeeds():
    step = new_step("succeeded")

    step.begin_confirm()
    step.schedule_confirm_retry(error=ERROR, next_attempt_at=timezone.now())
    step.finish_confirm()

    assert (step.state, step.confirm_attempts) == (SagaStep.State.CONFIRMED, 2)
    assert available(step) == set()


def test_a_tcc_confirm_that_gives_up_waits_for_an_operator():
    step = new_step("succeeded")
    step.begin_confirm()
    step.give_up_confirm(error=ERROR)

    assert available(step) == {"retry_confirm"}
    step.retry_confirm()
    assert (step.state, step.confirm_attempts) == (SagaStep.State.CONFIRMING, 2)
