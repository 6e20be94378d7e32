"""Saga definitions: retry policies, DAG validation and the place_order saga itself."""

from __future__ import annotations

import dataclasses

import pytest

from orchestration import definitions
from orchestration.definitions import (
    PLACE_ORDER,
    PLACE_ORDER_PARALLEL,
    RetryPolicy,
    SagaDefinition,
    StepSpec,
    get_definition,
)
from sagaplatform.kernel.commands import registered_operations

# --- RetryPolicy -------------------------------------------------------------------------------


def test_the_ceiling_doubles_from_the_initial_interval():
    policy = RetryPolicy(initial_interval=0.5, coefficient=2.0, max_interval=30.0)

    assert [policy.ceiling(n) for n in range(1, 7)] == [0.5, 1.0, 2.0, 4.0, 8.0, 16.0]


def test_the_ceiling_is_capped_at_max_interval():
    policy = RetryPolicy(initial_interval=0.5, coefficient=2.0, max_interval=30.0)

    assert policy.ceiling(7) == 30.0  # 32 capped
    assert policy.ceiling(60) == 30.0
    assert policy.delay(60) <= 30.0


def test_a_long_retry_budget_stays_capped_instead_of_overflowing():
    """A policy meant to retry for a long time (a TCC confirm retried until it succeeds)."""
    policy = RetryPolicy(max_attempts=5_000, initial_interval=0.5, coefficient=2.0, max_interval=60.0)

    assert policy.allows_another(1_025)
    assert policy.ceiling(1_025) == 60.0
    assert 0 <= policy.delay(4_999) <= 60.0


def test_the_coefficient_is_honoured():
    policy = RetryPolicy(initial_interval=1.0, coefficient=3.0, max_interval=100.0)

    assert [policy.ceiling(n) for n in (1, 2, 3, 4, 5)] == [1.0, 3.0, 9.0, 27.0, 81.0]


def test_a_coefficient_of_one_is_a_constant_interval():
    policy = RetryPolicy(initial_interval=2.0, coefficient=1.0, max_interval=100.0)

    assert {policy.ceiling(n) for n in range(1, 20)} == {2.0}


def test_full_jitter_draws_uniformly_between_zero_and_the_ceiling(monkeypatch):
    draws = []

    def uniform(low, high):
        draws.append((low, high))
        return high * 0.25

    monkeypatch.setattr(definitions.random, "uniform", uniform)
    policy = RetryPolicy(initial_interval=0.5, max_interval=4.0)

    delays = [policy.delay(n) for n in (1, 2, 3, 4, 5)]

    assert draws == [(0, 0.5), (0, 1.0), (0, 2.0), (0, 4.0), (0, 4.0)]
    assert delays == [0.125, 0.25, 0.5, 1.0, 1.0]


def test_full_jitter_stays_within_the_ceiling_and_spreads_out():
    policy = RetryPolicy(initial_interval=0.5, max_interval=30.0)

    for attempt in (1, 3, 8):
        ceiling = policy.ceiling(attempt)
        delays = [policy.delay(attempt) for _ in range(500)]
        assert all(0 <= d <= ceiling for d in delays)
        # Spread over the whole range, not bunched at the ceiling (which would be no jitter);
        # 500 uniform draws all missing a tenth of the range has odds of 0.9**500.
        assert min(delays) < ceiling * 0.1
        assert max(delays) > ceiling * 0.9
        assert len(set(delays)) > 450


def test_without_jitter_the_delay_is_the_ceiling():
    policy = RetryPolicy(initial_interval=0.5, max_interval=3.0, jitter=False)

    assert [policy.delay(n) for n in range(1, 6)] == [0.5, 1.0, 2.0, 3.0, 3.0]


@pytest.mark.parametrize(
    ("max_attempts", "allowed_after"),
    [(1, []), (3, [1, 2]), (5, [1, 2, 3, 4])],
)
def test_allows_another_until_max_attempts(max_attempts, allowed_after):
    policy = RetryPolicy(max_attempts=max_attempts)

    assert [n for n in range(0, 8) if policy.allows_another(n)] == [0, *allowed_after]


@pytest.mark.parametrize(
    "kwargs",
    [
        {"max_attempts": 0},
        {"max_attempts": -1},
        {"initial_interval": -0.1},
        {"coefficient": 0.5},
        {"coefficient": 0},
        {"max_interval": -1},
    ],
)
def test_an_invalid_policy_is_refused(kwargs):
    with pytest.raises(ValueError, match="invalid retry policy"):
        RetryPolicy(**kwargs)


def test_a_policy_cannot_be_changed_once_defined():
    policy = RetryPolicy()

    with pytest.raises(dataclasses.FrozenInstanceError):
        policy.max_attempts = 99


# --- SagaDefinition validation -----------------------------------------------------------------


def step(name: str, *depends_on: str) -> StepSpec:
    return StepSpec(name, "inventory", "reserve", "release", depends_on=depends_on)


def test_a_valid_dag_indexes_its_steps_and_knows_their_dependents():
    saga = SagaDefinition(
        name="fan_out",
        steps=(step("a"), step("b", "a"), step("c", "a"), step("d", "b", "c")),
        on_failure=(step("undo"),),
    )

    assert saga.step("c").depends_on == ("a",)
    assert saga.step("undo").name == "undo"
    assert [s.name for s in saga.dependents("a")] == ["b", "c"]
    assert [s.name for s in saga.dependents("c")] == ["d"]
    assert saga.dependents("d") == []
    with pytest.raises(KeyError):
        saga.step("nope")


def test_duplicate_step_names_are_refused():
    with pytest.raises(ValueError, match="duplicate step names"):
        SagaDefinition(name="dup", steps=(step("a"), step("b", "a"), step("a")))


def test_duplicate_failure_step_names_are_refused():
    with pytest.raises(ValueError, match="duplicate step names"):
        SagaDefinition(name="dup", steps=(step("a"),), on_failure=(step("x"), step("x")))


def test_a_failure_step_may_not_share_a_name_with_a_step():
    with pytest.raises(ValueError, match="shares a name"):
        SagaDefinition(name="clash", steps=(step("a"),), on_failure=(step("a"),))


def test_depending_on_an_unknown_step_is_refused():
    with pytest.raises(ValueError, match=r"depends on unknown or later steps \['ghost'\]"):
        SagaDefinition(name="bad", steps=(step("a"), step("b", "ghost")))


def test_depending_on_a_later_step_is_refused():
    with pytest.raises(ValueError, match=r"bad\.a depends on unknown or later steps \['b'\]"):
        SagaDefinition(name="bad", steps=(step("a", "b"), step("b")))


def test_depending_on_itself_is_refused():
    with pytest.raises(ValueError, match="depends on unknown or later steps"):
        SagaDefinition(name="bad", steps=(step("a", "a"),))


def test_a_failure_step_cannot_depend_on_an_action_step():
    """The two groups are ordered separately: failure steps depend only on failure steps."""
    with pytest.raises(ValueError, match="depends on unknown or later steps"):
        SagaDefinition(name="bad", steps=(step("a"),), on_failure=(step("undo", "a"),))


def test_definitions_do_not_share_their_step_index():
    one = SagaDefinition(name="one", steps=(step("a"),))
    two = SagaDefinition(name="two", steps=(step("b"),))

    assert one.step("a").name == "a"
    with pytest.raises(KeyError):
        one.step("b")
    with pytest.raises(KeyError):
        two.step("a")


# --- place_order -------------------------------------------------------------------------------


def test_place_order_runs_its_steps_in_order_then_finishes_in_parallel():
    names = [s.name for s in PLACE_ORDER.steps]

    assert names == [
        "reserve_stock",
        "charge_payment",
        "approve_order",
        "schedule_shipment",
        "dispatch_shipment",
        "commit_stock",
        "mark_shipped",
        "notify_customer",
    ]
    # A chain up to the dispatch, then three steps side by side after it.
    assert [s.depends_on for s in PLACE_ORDER.steps] == [
        (),
        ("reserve_stock",),
        ("charge_payment",),
        ("approve_order",),
        ("schedule_shipment",),
        ("dispatch_shipment",),
        ("dispatch_shipment",),
        ("dispatch_shipment",),
    ]


def test_the_parallel_definition_reserves_and_charges_side_by_side():
    steps = {s.name: s.depends_on for s in PLACE_ORDER_PARALLEL.steps}

    assert steps["reserve_stock"] == ()
    assert steps["charge_payment"] == ()
    assert steps["approve_order"] == ("reserve_stock", "charge_payment")
    assert [s.name for s in PLACE_ORDER_PARALLEL.dependents("charge_payment")] == ["approve_order"]
    assert PLACE_ORDER_PARALLEL.steps[3:] == PLACE_ORDER.steps[3:]


def test_place_order_names_each_steps_service_action_and_compensation():
    assert [(s.service, s.action, s.compensation) for s in PLACE_ORDER.steps] == [
        ("inventory", "reserve", "release"),
        ("payments", "charge", "refund"),
        ("orders", "approve", "revoke"),
        ("shipping", "schedule", "cancel"),
        ("shipping", "dispatch", None),  # goods in transit stay shipped
        ("inventory", "commit", None),
        ("orders", "ship", None),
        ("notifications", "send_confirmation", None),  # a message sent cannot be unsent
    ]


def test_place_order_on_failure_rejects_the_order_then_tells_the_customer():
    assert [(s.name, s.service, s.action, s.depends_on) for s in PLACE_ORDER.on_failure] == [
        ("reject_order", "orders", "reject", ()),
        ("notify_failure", "notifications", "send_failure", ("reject_order",)),
    ]
    assert all(s.compensation is None for s in PLACE_ORDER.on_failure)


def test_every_operation_place_order_names_is_registered_by_its_service():
    for spec in (*PLACE_ORDER.steps, *PLACE_ORDER.on_failure):
        operations = registered_operations(spec.service)
        assert spec.action in operations, spec
        if spec.compensation:
            assert spec.compensation in operations, spec


def test_dispatching_the_parcel_is_the_point_of_no_return_after_a_handling_window(settings):
    assert [s.name for s in (*PLACE_ORDER.steps, *PLACE_ORDER.on_failure) if s.pivot] == ["dispatch_shipment"]
    settings.SHIPPING_HANDLING_SECONDS = 42
    assert PLACE_ORDER.step("dispatch_shipment").start_delay() == 42.0
    assert PLACE_ORDER.step("schedule_shipment").start_delay() == 0.0


def test_timeouts_can_only_be_shortened_by_the_override(settings):
    spec = PLACE_ORDER.step("charge_payment")
    settings.SAGA_STEP_TIMEOUT_OVERRIDE = 0.0
    assert spec.effective_timeout() == spec.timeout == 30.0

    settings.SAGA_STEP_TIMEOUT_OVERRIDE = 2.0
    assert spec.effective_timeout() == 2.0

    settings.SAGA_STEP_TIMEOUT_OVERRIDE = 300.0
    assert spec.effective_timeout() == 30.0


def test_the_saga_deadline_can_be_overridden(settings):
    settings.SAGA_DEADLINE_OVERRIDE = 0.0
    assert PLACE_ORDER.effective_deadline() == PLACE_ORDER.deadline == 600.0

    settings.SAGA_DEADLINE_OVERRIDE = 5.0
    assert PLACE_ORDER.effective_deadline() == 5.0


def test_only_the_payment_step_sees_the_payment_method():
    assert [s.name for s in (*PLACE_ORDER.steps, *PLACE_ORDER.on_failure) if "payment_method" in s.inputs] == [
        "charge_payment"
    ]
    assert all("order_id" in s.inputs for s in (*PLACE_ORDER.steps, *PLACE_ORDER.on_failure))


def test_failure_reporting_steps_retry_longer_than_the_default():
    """Telling the customer must not give up after five attempts."""
    for spec in (PLACE_ORDER.step("notify_customer"), *PLACE_ORDER.on_failure):
        assert spec.retry.max_attempts > RetryPolicy().max_attempts
    for spec in PLACE_ORDER.steps:
        assert spec.compensation_retry.max_attempts >= 10


def test_definitions_are_found_by_name():
    assert get_definition("place_order") is PLACE_ORDER
    with pytest.raises(LookupError, match="no saga definition named 'nope'"):
        get_definition("nope")


def test_the_retry_backoff_override_caps_every_policy(settings):
    policy = RetryPolicy(max_attempts=30, initial_interval=1.0, max_interval=60.0, jitter=False)
    assert policy.delay(10) == 60.0
    settings.SAGA_RETRY_MAX_INTERVAL_OVERRIDE = 2.0
    assert [policy.delay(n) for n in (1, 2, 3, 10)] == [1.0, 2.0, 2.0, 2.0]
