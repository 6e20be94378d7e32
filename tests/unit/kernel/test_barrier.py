"""The sub-transaction barrier, through the command contract, for every service operation.

A command is delivered at least once, possibly late, possibly after its compensation. Whatever
the order, each (saga, step, op) takes effect at most once, a compensation for an action that
never ran does nothing and blocks that action, and a failure leaves no partial effects.
"""

from __future__ import annotations

import threading
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from decimal import Decimal

import pytest
from django.conf import settings
from django.db import connections, transaction

from inventory.models import Reservation, StockItem
from inventory.services import stock_set
from notifications.models import Notification
from orders.models import Order, OrderStatusChange
from payments.models import Charge, LedgerEntry
from payments.services import payment_method_add
from sagaplatform.kernel import barrier, commands
from sagaplatform.kernel.commands import ACTION, COMPENSATE, CONFIRM, REPLY_TASK
from sagaplatform.kernel.errors import TransientError
from sagaplatform.kernel.models import Barrier, OutboxMessage
from sagaplatform.observability import metrics
from shipping.models import Shipment
from tests.conftest import ADDRESS

pytestmark = pytest.mark.django_db(databases="__all__")

ALIASES = settings.DATABASE_ALIASES
ON_POSTGRES = settings.DATABASES["inventory"]["ENGINE"].endswith("postgresql")
REFUSED = {
    "status": "business_failure",
    "error": {
        "code": "compensated_before_action",
        "message": "The compensation arrived first; the action is refused.",
    },
}
NULL_COMPENSATION = {"status": "succeeded", "result": {}, "barrier": "null_compensation"}


# --- helpers ----------------------------------------------------------------------------------


def message(*, saga_id, step: str, op: str, operation: str, payload: dict, attempt: int = 1) -> dict:
    return commands.Command(
        saga_id=saga_id, step=step, op=op, operation=operation, attempt=attempt, payload=payload
    ).to_message()


def world() -> dict:
    """Every business row of every service (not the barrier, not the replies)."""
    return {
        "stock": {
            sku: (on_hand, reserved, version)
            for sku, on_hand, reserved, version in StockItem.objects.using("inventory").values_list(
                "sku", "on_hand", "reserved", "version"
            )
        },
        "reservations": sorted(
            Reservation.objects.using("inventory").values_list("saga_id", "sku", "quantity", "state")
        ),
        # A pending charge (the intent recorded before the gateway call), a declined one and a
        # cancelled one hold no money: tests/unit/services/test_payments.py covers them.
        "charges": sorted(
            Charge.objects.using("payments")
            .exclude(state__in=[Charge.State.PENDING, Charge.State.DECLINED, Charge.State.CANCELLED])
            .values_list("saga_id", "amount", "state")
        ),
        "ledger": sorted(LedgerEntry.objects.using("payments").values_list("charge__saga_id", "kind", "amount")),
        "orders": sorted(Order.objects.using("orders").values_list("id", "status", "failure_code")),
        "order_history": sorted(
            OrderStatusChange.objects.using("orders").values_list("order_id", "from_status", "to_status")
        ),
        "shipments": sorted(Shipment.objects.using("shipping").values_list("saga_id", "state")),
        "notifications": sorted(
            Notification.objects.using("notifications").values_list("order_id", "kind", "channel", "state")
        ),
        "outbox": {
            alias: OutboxMessage.objects.using(alias).exclude(task=REPLY_TASK).count()
            for alias in ALIASES
            if OutboxMessage.objects.using(alias).exclude(task=REPLY_TASK).exists()
        },
    }


def changed(before: dict, after: dict) -> set[str]:
    return {key for key in before if before[key] != after[key]}


def barrier_rows(service: str, saga_id) -> dict[tuple[str, str], dict | None]:
    return {(b.step, b.op): b.outcome for b in Barrier.objects.using(service).filter(saga_id=saga_id)}


def replies(alias: str) -> list[dict]:
    return [m.payload for m in OutboxMessage.objects.using(alias).filter(task=REPLY_TASK).order_by("created_at")]


def reply_counts() -> dict[str, int]:
    return {alias: OutboxMessage.objects.using(alias).filter(task=REPLY_TASK).count() for alias in ALIASES}


# --- the operations under test ----------------------------------------------------------------


@dataclass(frozen=True)
class Operation:
    service: str
    operation: str
    step: str
    op: str = ACTION
    requires: tuple[str, ...] = ()  # operations that must have run first for the same saga


OPERATIONS = {
    "reserve": Operation("inventory", "reserve", "reserve_stock"),
    "release": Operation("inventory", "release", "reserve_stock", COMPENSATE, requires=("reserve",)),
    "commit": Operation("inventory", "commit", "commit_stock", requires=("reserve",)),
    "charge": Operation("payments", "charge", "charge_payment"),
    "refund": Operation("payments", "refund", "charge_payment", COMPENSATE, requires=("charge",)),
    "approve": Operation("orders", "approve", "approve_order"),
    "revoke": Operation("orders", "revoke", "approve_order", COMPENSATE, requires=("approve",)),
    "reject": Operation("orders", "reject", "reject_order"),
    "schedule": Operation("shipping", "schedule", "schedule_shipment"),
    "cancel": Operation("shipping", "cancel", "schedule_shipment", COMPENSATE, requires=("schedule",)),
    "dispatch": Operation("shipping", "dispatch", "dispatch_shipment", requires=("schedule",)),
    "ship": Operation("orders", "ship", "mark_shipped", requires=("approve",)),
    # TCC participants: try (action), confirm, cancel (compensate).
    "authorize": Operation("payments", "authorize", "charge_payment"),
    "capture": Operation("payments", "capture", "charge_payment", CONFIRM, requires=("authorize",)),
    "void": Operation("payments", "void", "charge_payment", COMPENSATE, requires=("authorize",)),
    "book_tentative": Operation("shipping", "book_tentative", "schedule_shipment"),
    "confirm_booking": Operation(
        "shipping", "confirm_booking", "schedule_shipment", CONFIRM, requires=("book_tentative",)
    ),
    "check_pending": Operation("orders", "check_pending", "approve_order"),
    "release_check": Operation("orders", "release_check", "approve_order", COMPENSATE, requires=("check_pending",)),
    # Choreography's cancellation: hold a dispatch that never ran (a no-op that blocks it).
    "hold_dispatch": Operation("shipping", "hold_dispatch", "dispatch_shipment", COMPENSATE, requires=("schedule",)),
    "send_confirmation": Operation("notifications", "send_confirmation", "notify_customer"),
    "send_failure": Operation("notifications", "send_failure", "notify_failure"),
}
# Each compensation beside the action it undoes (same step).
PAIRS = [("reserve", "release"), ("charge", "refund"), ("approve", "revoke"), ("schedule", "cancel")]


@dataclass
class SagaContext:
    """One saga's id and context, as the orchestrator would send it to every service."""

    id: uuid.UUID
    context: dict

    def message(self, name: str, *, attempt: int = 1, **overrides) -> dict:
        spec = OPERATIONS[name]
        return message(
            saga_id=self.id,
            step=spec.step,
            op=spec.op,
            operation=spec.operation,
            payload={**self.context, **overrides},
            attempt=attempt,
        )

    def run(self, name: str, **overrides) -> dict:
        return commands.run(service=OPERATIONS[name].service, message=self.message(name, **overrides))

    def execute(self, name: str, **overrides) -> dict:
        return commands.execute(service=OPERATIONS[name].service, message=self.message(name, **overrides))

    def prepare(self, name: str) -> None:
        for required in OPERATIONS[name].requires:
            self.prepare(required)
            assert self.run(required)["status"] == "succeeded"


@pytest.fixture
def new_saga(catalogue, broker):
    def make(*, items: list[dict] | None = None, token: str = "tok_visa") -> SagaContext:
        order = Order.objects.using("orders").create(
            customer_id=1, customer_email="alice@example.com", total=Decimal("25.00"), shipping_address=ADDRESS
        )
        return SagaContext(
            id=uuid.uuid4(),
            context={
                "order_id": str(order.id),
                "items": items or [{"sku": "SKU-MUG", "quantity": 2}],
                "amount": "25.00",
                "currency": "EUR",
                "payment_method": payment_method_add(token=token),
                "customer_email": "alice@example.com",
                "shipping_address": {**ADDRESS, "phone": "+33612345678"},
                "failure": {"code": "card_declined", "message": "The card was declined"},
            },
        )

    return make


# What one delivery of each operation changes, and nothing else.
EFFECTS = {
    "reserve": {"stock", "reservations"},
    "release": {"stock", "reservations"},
    "commit": {"stock", "reservations"},
    "charge": {"charges", "ledger"},
    "refund": {"charges", "ledger"},
    "approve": {"orders", "order_history"},
    "revoke": {"orders", "order_history"},
    "reject": {"orders", "order_history"},
    "schedule": {"shipments"},
    "cancel": {"shipments"},
    "dispatch": {"shipments"},
    "ship": {"orders", "order_history"},
    "authorize": {"charges"},
    "capture": {"charges", "ledger"},
    "void": {"charges"},
    "book_tentative": {"shipments"},
    "confirm_booking": {"shipments"},
    "check_pending": set(),
    "release_check": set(),
    "hold_dispatch": set(),
    "send_confirmation": {"notifications", "outbox"},
    "send_failure": {"notifications", "outbox"},
}


def check_effect(name: str, saga: SagaContext, before: dict, after: dict) -> None:
    """The precise effect of one delivery of `name` for `saga`."""
    order_id = uuid.UUID(saga.context["order_id"])
    mug_before = before["stock"]["SKU-MUG"]
    mug_after = after["stock"]["SKU-MUG"]
    match name:
        case "reserve":
            assert mug_after == (mug_before[0], mug_before[1] + 2, mug_before[2] + 1)
            assert after["reservations"] == [(saga.id, "SKU-MUG", 2, "held")]
        case "release":
            assert mug_after == (mug_before[0], mug_before[1] - 2, mug_before[2] + 1)
            assert after["reservations"] == [(saga.id, "SKU-MUG", 2, "released")]
        case "commit":
            assert mug_after == (mug_before[0] - 2, mug_before[1] - 2, mug_before[2] + 1)
            assert after["reservations"] == [(saga.id, "SKU-MUG", 2, "committed")]
        case "charge":
            assert after["charges"] == [(saga.id, Decimal("25.00"), "captured")]
            assert after["ledger"] == [(saga.id, "charge", Decimal("25.00"))]
        case "refund":
            assert after["charges"] == [(saga.id, Decimal("25.00"), "refunded")]
            assert after["ledger"] == [(saga.id, "charge", Decimal("25.00")), (saga.id, "refund", Decimal("-25.00"))]
        case "approve":
            assert after["orders"] == [(order_id, "approved", "")]
            assert set(after["order_history"]) - set(before["order_history"]) == {(order_id, "pending", "approved")}
        case "revoke":
            assert after["orders"] == [(order_id, "pending", "")]
            assert len(after["order_history"]) == len(before["order_history"]) + 1
            assert (order_id, "approved", "pending") in after["order_history"]
        case "reject":
            assert after["orders"] == [(order_id, "rejected", "card_declined")]
            assert set(after["order_history"]) - set(before["order_history"]) == {(order_id, "pending", "rejected")}
        case "schedule":
            assert after["shipments"] == [(saga.id, "scheduled")]
        case "cancel":
            assert after["shipments"] == [(saga.id, "cancelled")]
        case "dispatch":
            assert after["shipments"] == [(saga.id, "dispatched")]
        case "ship":
            assert after["orders"] == [(order_id, "shipped", "")]
            assert set(after["order_history"]) - set(before["order_history"]) == {(order_id, "approved", "shipped")}
        case "authorize":
            assert after["charges"] == [(saga.id, Decimal("25.00"), "authorized")]
            assert after["ledger"] == []  # a hold is not money taken
        case "capture":
            assert after["charges"] == [(saga.id, Decimal("25.00"), "captured")]
            assert after["ledger"] == [(saga.id, "charge", Decimal("25.00"))]
        case "void":
            assert after["charges"] == [(saga.id, Decimal("25.00"), "voided")]
            assert after["ledger"] == []
        case "book_tentative":
            assert after["shipments"] == [(saga.id, "tentative")]
        case "confirm_booking":
            assert after["shipments"] == [(saga.id, "scheduled")]
        case "check_pending" | "release_check" | "hold_dispatch":
            pass  # nothing to change: the barrier row is the whole effect
        case "send_confirmation" | "send_failure":
            kind = "order_confirmed" if name == "send_confirmation" else "order_failed"
            assert after["notifications"] == sorted(
                [(order_id, kind, "email", "queued"), (order_id, kind, "sms", "queued")]
            )
            assert after["outbox"] == {"notifications": 2}  # one delivery message per channel
        case _:
            raise AssertionError(name)
    assert changed(before, after) == EFFECTS[name]


def test_every_registered_service_operation_is_covered_here():
    registered = {
        (service, name) for service in settings.SERVICE_ALIASES for name in commands.registered_operations(service)
    }

    assert {(o.service, o.operation) for o in OPERATIONS.values()} == registered


# --- duplicates ---------------------------------------------------------------------------------


@pytest.mark.parametrize("name", OPERATIONS)
def test_a_duplicate_delivery_replays_the_stored_outcome_without_a_second_effect(name, new_saga):
    saga = new_saga()
    saga.prepare(name)
    spec = OPERATIONS[name]
    before = world()

    first = saga.run(name)
    once = world()
    second = saga.run(name)

    assert first["status"] == "succeeded"
    assert "replayed" not in first
    check_effect(name, saga, before, once)
    assert second == {**first, "replayed": True}
    assert world() == once
    assert barrier_rows(spec.service, saga.id)[(spec.step, spec.op)] == first


@pytest.mark.parametrize("name", [n for n, o in OPERATIONS.items() if o.op == ACTION])
def test_a_command_writes_its_row_once_with_its_outcome_and_a_duplicate_replays_it(name, new_saga):
    """A command's action runs first and its row is inserted with the outcome, in one statement
    (an action whose intent was recorded before its outside call reads and locks that row, then
    stores its outcome there: no second insert);
    the same command again finds the row, its second run is rolled back, and it replays."""
    from django.test.utils import CaptureQueriesContext

    saga = new_saga()
    saga.prepare(name)
    spec = OPERATIONS[name]
    before = world()
    table = Barrier._meta.db_table

    with CaptureQueriesContext(connections[spec.service]) as queries:
        first = saga.execute(name)
    once = world()
    second = saga.execute(name)

    writes = [q["sql"].split()[0] for q in queries.captured_queries if f'"{table}"' in q["sql"].split(" WHERE ")[0]]
    assert first["status"] == "succeeded"
    check_effect(name, saga, before, once)
    begun = commands.calls_outside(spec.service, spec.operation)
    if begun:
        assert writes == ["INSERT", "SELECT", "UPDATE"], writes  # intent, lock, outcome
    elif connections[spec.service].vendor == "postgresql":
        # The row and the reply in one statement (two data-modifying parts).
        assert writes == ["WITH"], writes
        combined = next(q["sql"] for q in queries.captured_queries if q["sql"].startswith("WITH"))
        assert f'INSERT INTO "{table}"' in combined
        assert f'INSERT INTO "{OutboxMessage._meta.db_table}"' in combined
    else:
        assert writes == ["INSERT"], writes
    assert second == {**first, "replayed": True}
    assert world() == once
    assert barrier_rows(spec.service, saga.id)[(spec.step, spec.op)] == first


def test_the_replay_returns_the_first_outcome_even_when_running_again_would_answer_differently(new_saga):
    """Release is idempotent on its own (it would release 0 the second time); the barrier
    answers with what the first delivery did."""
    saga = new_saga()
    saga.prepare("release")

    first = saga.run("release")
    second = saga.run("release")

    assert first["result"] == {"released": 1}
    assert second["result"] == {"released": 1}
    assert second["replayed"] is True


def test_the_same_step_in_another_saga_is_not_a_duplicate(new_saga):
    one, two = new_saga(), new_saga()

    first = one.run("reserve")
    other = two.run("reserve")

    assert "replayed" not in other
    assert other["result"]["reserved"][0]["version"] == first["result"]["reserved"][0]["version"] + 1
    assert StockItem.objects.using("inventory").get(sku="SKU-MUG").reserved == 4
    assert Reservation.objects.using("inventory").count() == 2


@pytest.mark.django_db(transaction=True, databases="__all__")
@pytest.mark.parametrize("path", ["run", "execute"])  # the row first; the action first (a command's)
def test_concurrent_duplicates_take_effect_once(new_saga, path):
    """Eight workers get the same redelivered command at the same instant."""
    saga = new_saga()
    workers = 8
    start = threading.Barrier(workers, timeout=30)

    def deliver(_):
        try:
            start.wait()
            return getattr(saga, path)("reserve")
        finally:
            connections.close_all()

    with ThreadPoolExecutor(max_workers=workers) as pool:
        outcomes = list(pool.map(deliver, range(workers)))

    fresh = [o for o in outcomes if not o.get("replayed")]
    assert len(fresh) == 1
    assert all(o == {**fresh[0], "replayed": True} for o in outcomes if o is not fresh[0])
    assert StockItem.objects.using("inventory").get(sku="SKU-MUG").reserved == 2
    assert Reservation.objects.using("inventory").filter(saga_id=saga.id).count() == 1


# --- compensation before action ----------------------------------------------------------------


@pytest.mark.parametrize(("action", "compensation"), PAIRS)
def test_a_compensation_before_its_action_is_null_and_refuses_the_late_action(action, compensation, new_saga):
    bystander = new_saga()  # its action did run: a compensation must not touch it
    bystander.prepare(action)
    assert bystander.run(action)["status"] == "succeeded"
    saga = new_saga()
    spec = OPERATIONS[action]
    before = world()

    nulled = saga.run(compensation)
    late = saga.run(action)

    assert nulled == NULL_COMPENSATION
    assert late == {**REFUSED, "replayed": True}
    assert world() == before
    assert barrier_rows(spec.service, saga.id) == {
        (spec.step, ACTION): REFUSED,
        (spec.step, COMPENSATE): NULL_COMPENSATION,
    }


@pytest.mark.django_db(transaction=True, databases="__all__")
@pytest.mark.parametrize(("action", "compensation"), PAIRS)
def test_a_compensation_racing_its_action_either_undoes_it_or_blocks_it(action, compensation, new_saga):
    """A step times out, so the orchestrator compensates while the action is still in flight."""
    sagas = [new_saga() for _ in range(10)]
    jobs = [(saga, name) for saga in sagas for name in (action, compensation)]
    start = threading.Barrier(len(jobs), timeout=60)

    def deliver(job):
        saga, name = job
        try:
            start.wait()
            for attempt in range(1, 20):
                try:
                    return saga.run(name, attempt=attempt)
                except TransientError:
                    # A refund that finds the charge still pending at the gateway is retried,
                    # as the engine retries a compensation.
                    assert name == compensation == "refund"
            raise AssertionError("never settled")
        finally:
            connections.close_all()

    with ThreadPoolExecutor(max_workers=len(jobs)) as pool:
        outcomes = list(pool.map(deliver, jobs))

    ran = 0
    for i in range(len(sagas)):
        acted, undone = outcomes[2 * i], outcomes[2 * i + 1]
        if undone == NULL_COMPENSATION:  # the compensation won: the action was refused
            if acted.get("error", {}).get("code") == "charge_cancelled":
                # ...or, once the charge's intent committed, given up before any gateway call.
                assert action == "charge"
                continue
            assert acted == {**REFUSED, "replayed": True}
        else:  # the action won: the compensation undid it
            assert acted["status"] == "succeeded"
            # A refund finishes a charge it finds pending, and stores the action's outcome: the
            # action then replays it.
            assert "replayed" not in acted or action == "charge"
            assert undone["status"] == "succeeded"
            assert "barrier" not in undone
            ran += 1
    after = world()
    if action == "reserve":
        assert after["stock"]["SKU-MUG"][1] == 0
        assert [state for *_, state in after["reservations"]] == ["released"] * ran
    elif action == "charge":
        assert [state for *_, state in after["charges"]] == ["refunded"] * ran
        assert sum(amount for *_, amount in after["ledger"]) == Decimal("0.00")
    elif action == "approve":
        assert {status for _, status, _ in after["orders"]} == {"pending"}
        assert len(after["order_history"]) == 2 * ran
    else:
        assert [state for _, state in after["shipments"]] == ["cancelled"] * ran


@pytest.mark.parametrize(("action", "compensation"), PAIRS)
def test_after_a_null_compensation_every_redelivery_is_a_replay(action, compensation, new_saga):
    saga = new_saga()
    saga.run(compensation)
    before = world()

    again = [saga.run(compensation), saga.run(action), saga.run(compensation), saga.run(action)]

    assert again == [
        {**NULL_COMPENSATION, "replayed": True},
        {**REFUSED, "replayed": True},
        {**NULL_COMPENSATION, "replayed": True},
        {**REFUSED, "replayed": True},
    ]
    assert world() == before


@pytest.mark.parametrize(("action", "compensation"), PAIRS)
def test_a_compensation_after_its_action_undoes_it(action, compensation, new_saga):
    saga = new_saga()
    before = world()

    assert saga.run(action)["status"] == "succeeded"
    undone = saga.run(compensation)

    assert undone["status"] == "succeeded"
    assert "barrier" not in undone
    after = world()
    # Undone by a reverse record, never by deleting the action's rows.
    if action == "reserve":
        assert after["stock"]["SKU-MUG"][:2] == before["stock"]["SKU-MUG"][:2]
        assert after["reservations"] == [(saga.id, "SKU-MUG", 2, "released")]
    elif action == "charge":
        assert sum(amount for _, _, amount in after["ledger"]) == Decimal("0.00")
        assert len(after["ledger"]) == 2
    elif action == "approve":
        assert after["orders"] == [(uuid.UUID(saga.context["order_id"]), "pending", "")]
        assert len(after["order_history"]) == 2
    else:
        assert after["shipments"] == [(saga.id, "cancelled")]


@pytest.mark.parametrize(
    ("action", "undo", "kwargs"),
    [
        ("reserve", "release", {"items": [{"sku": "SKU-LAMP", "quantity": 11}]}),
        ("charge", "refund", {"token": "tok_declined"}),
    ],
)
def test_compensating_an_action_that_failed_is_a_null_compensation(new_saga, action, undo, kwargs):
    """The engine compensates a step whose fate is unknown, and a TCC cancel can reach a try
    that failed meanwhile: a failure is stored without its effects, so the undo is a no-op (and
    is recorded as one, so the audit does not see an undo without an action)."""
    saga = new_saga(**kwargs)
    before = world()

    failed = saga.run(action)
    undone = saga.run(undo)

    assert failed["status"] == "business_failure"
    assert undone == NULL_COMPENSATION
    assert world() == before


# --- business failures -------------------------------------------------------------------------


def test_a_business_failure_is_stored_without_its_partial_effects(new_saga):
    """SKU-BOOK (taken first, SKUs go in sorted order) fits; SKU-LAMP does not."""
    saga = new_saga(items=[{"sku": "SKU-LAMP", "quantity": 11}, {"sku": "SKU-BOOK", "quantity": 3}])
    before = world()

    outcome = saga.run("reserve")

    assert outcome["status"] == "business_failure"
    assert outcome["error"]["code"] == "insufficient_stock"
    assert outcome["error"]["details"] == {"sku": "SKU-LAMP", "requested": 11, "available": 10}
    assert world() == before
    assert StockItem.objects.using("inventory").get(sku="SKU-BOOK").reserved == 0
    assert not Reservation.objects.using("inventory").exists()
    assert barrier_rows("inventory", saga.id) == {("reserve_stock", ACTION): outcome}


def test_a_stored_business_failure_is_replayed_even_once_it_could_succeed(new_saga):
    saga = new_saga(items=[{"sku": "SKU-LAMP", "quantity": 11}])
    first = saga.run("reserve")
    stock_set(sku="SKU-LAMP", on_hand=100)
    before = world()

    again = saga.run("reserve")

    assert again == {**first, "replayed": True}
    assert world() == before
    assert not Reservation.objects.using("inventory").exists()


@pytest.mark.parametrize(
    ("name", "saga_kwargs", "code"),
    [
        ("reserve", {"items": [{"sku": "SKU-NOPE", "quantity": 1}]}, "unknown_sku"),
        ("charge", {"token": "tok_declined"}, "card_declined"),
    ],
)
def test_business_failures_leave_nothing_behind(name, saga_kwargs, code, new_saga):
    saga = new_saga(**saga_kwargs)
    before = world()

    outcome = saga.run(name)

    assert outcome["status"] == "business_failure"
    assert outcome["error"]["code"] == code
    assert world() == before


def test_the_barrier_rolls_back_what_an_operation_wrote_before_its_business_failure(new_saga, monkeypatch):
    """Even an operation that does not roll itself back leaves nothing behind."""
    from sagaplatform.kernel.errors import BusinessError
    from shipping import services as shipping_services

    def half_then_refuse(**kwargs):
        Shipment.objects.using("shipping").create(
            saga_id=kwargs["saga_id"], order_id=kwargs["order_id"], address={}, tracking_number="HALF-DONE"
        )
        raise BusinessError("No carrier serves this address", code="address_unserviceable")

    saga = new_saga()
    monkeypatch.setattr(shipping_services, "shipment_schedule", half_then_refuse)
    before = world()

    outcome = saga.run("schedule")

    assert outcome["status"] == "business_failure"
    assert outcome["error"]["code"] == "address_unserviceable"
    assert world() == before
    assert not Shipment.objects.using("shipping").exists()
    assert barrier_rows("shipping", saga.id) == {("schedule_shipment", ACTION): outcome}


def test_approving_a_rejected_order_is_a_stored_business_failure(new_saga):
    saga = new_saga()
    saga.run("reject")
    before = world()

    outcome = saga.run("approve")

    assert outcome["status"] == "business_failure"
    assert outcome["error"]["code"] == "order_not_in_state"
    assert world() == before


# --- transient errors --------------------------------------------------------------------------


def test_a_transient_error_leaves_no_outcome_so_the_next_attempt_runs(new_saga):
    from payments.exceptions import GatewayUnavailable

    saga = new_saga(token="tok_flaky_2")
    before = world()

    for attempt in (1, 2):
        with pytest.raises(GatewayUnavailable):
            commands.run(service="payments", message=saga.message("charge", attempt=attempt))
        # Only the intent, committed before the gateway call: a row with no outcome.
        assert barrier_rows("payments", saga.id) == {("charge_payment", ACTION): None}
        assert world() == before

    third = commands.run(service="payments", message=saga.message("charge", attempt=3))

    assert third["status"] == "succeeded"
    assert "replayed" not in third
    assert Charge.objects.using("payments").get(saga_id=saga.id).amount == Decimal("25.00")
    assert barrier_rows("payments", saga.id) == {("charge_payment", ACTION): third}


def test_an_unexpected_error_rolls_the_barrier_row_back_too(new_saga, monkeypatch):
    from shipping import services as shipping_services

    def broken(**kwargs):
        Shipment.objects.using("shipping").create(
            saga_id=kwargs["saga_id"], order_id=kwargs["order_id"], address={}, tracking_number="HALF-DONE"
        )
        raise RuntimeError("carrier API exploded")

    saga = new_saga()
    monkeypatch.setattr(shipping_services, "shipment_schedule", broken)
    before = world()

    with pytest.raises(RuntimeError):
        saga.run("schedule")

    assert world() == before
    assert barrier_rows("shipping", saga.id) == {}


@pytest.mark.django_db(transaction=True, databases="__all__")
def test_the_barrier_refuses_to_run_outside_a_transaction(new_saga):
    saga = new_saga()
    command = commands.Command.from_message(saga.message("schedule"))

    with pytest.raises(RuntimeError, match=r"transaction\.atomic"):
        barrier.call(using="shipping", command=command, fn=lambda **kwargs: {})

    assert not Barrier.objects.using("shipping").exists()


# --- execute(): one reply per delivery ---------------------------------------------------------


@pytest.mark.parametrize("name", OPERATIONS)
def test_execute_writes_exactly_one_reply_on_the_services_own_database(name, new_saga):
    saga = new_saga()
    saga.prepare(name)  # run() writes no reply
    spec = OPERATIONS[name]
    assert sum(reply_counts().values()) == 0

    outcome = saga.execute(name)

    assert outcome["status"] == "succeeded"
    assert reply_counts() == {alias: int(alias == spec.service) for alias in ALIASES}
    reply = OutboxMessage.objects.using(spec.service).get(task=REPLY_TASK)
    assert reply.queue == "orchestrator"
    assert reply.published_at is None  # published after commit, which this test never reaches
    assert reply.payload == {
        "saga_id": str(saga.id),
        "step": spec.step,
        "op": spec.op,
        "attempt": 1,
        **outcome,
    }


def test_execute_replies_to_a_duplicate_with_the_replayed_outcome(new_saga):
    saga = new_saga()

    first = saga.execute("charge")
    second = saga.execute("charge")

    assert replies("payments") == [
        {"saga_id": str(saga.id), "step": "charge_payment", "op": "action", "attempt": 1, **first},
        {"saga_id": str(saga.id), "step": "charge_payment", "op": "action", "attempt": 1, **second},
    ]
    assert second == {**first, "replayed": True}
    assert Charge.objects.using("payments").count() == 1


def test_execute_replies_business_failure(new_saga):
    saga = new_saga(token="tok_declined")
    before = world()

    outcome = saga.execute("charge")

    assert outcome["status"] == "business_failure"
    assert outcome["error"] == {
        "code": "card_declined",
        "message": "The card was declined",
        "details": {"decline_code": "generic_decline"},
    }
    assert [r["status"] for r in replies("payments")] == ["business_failure"]
    assert replies("payments")[0]["error"] == outcome["error"]
    assert world() == before


def test_execute_replies_transient_error_and_keeps_no_outcome(new_saga):
    saga = new_saga(token="tok_flaky_1")
    before = world()

    failed = commands.execute(service="payments", message=saga.message("charge", attempt=1))

    assert failed == {
        "status": "transient_error",
        "error": {"code": "gateway_unavailable", "message": "Gateway timeout (attempt 1)", "details": {}},
    }
    assert replies("payments") == [
        {"saga_id": str(saga.id), "step": "charge_payment", "op": "action", "attempt": 1, **failed}
    ]
    assert barrier_rows("payments", saga.id) == {("charge_payment", ACTION): None}
    assert world() == before

    retried = commands.execute(service="payments", message=saga.message("charge", attempt=2))

    assert retried["status"] == "succeeded"
    assert [(r["attempt"], r["status"]) for r in replies("payments")] == [(1, "transient_error"), (2, "succeeded")]
    assert Charge.objects.using("payments").filter(saga_id=saga.id).count() == 1


def test_execute_counts_an_unexpected_error_as_transient(new_saga):
    saga = new_saga()
    message_without_address = saga.message("schedule")
    del message_without_address["payload"]["shipping_address"]
    before = world()

    outcome = commands.execute(service="shipping", message=message_without_address)

    assert outcome["status"] == "transient_error"
    assert outcome["error"]["code"] == "unexpected_error"
    assert "KeyError" in outcome["error"]["message"]
    assert [r["status"] for r in replies("shipping")] == ["transient_error"]
    assert barrier_rows("shipping", saga.id) == {}
    assert world() == before


def test_execute_refuses_an_unknown_operation_with_a_business_failure(new_saga):
    saga = new_saga()
    bogus = message(saga_id=saga.id, step="reserve_stock", op=ACTION, operation="teleport", payload=saga.context)
    before = world()

    outcome = commands.execute(service="inventory", message=bogus)

    assert outcome["status"] == "business_failure"
    assert outcome["error"]["code"] == "unknown_operation"
    assert [r["status"] for r in replies("inventory")] == ["business_failure"]
    assert reply_counts() == {alias: int(alias == "inventory") for alias in ALIASES}
    assert barrier_rows("inventory", saga.id) == {}
    assert world() == before


@pytest.mark.django_db(transaction=True, databases="__all__")
def test_execute_publishes_the_reply_after_commit(new_saga, broker):
    saga = new_saga()

    outcome = saga.execute("reserve")

    assert [(m["task"], m["queue"], m["payload"]["status"]) for m in broker.queue] == [
        ("orchestration.handle_reply", "orchestrator", "succeeded")
    ]
    assert broker.queue[0]["payload"]["result"] == outcome["result"]
    reply = OutboxMessage.objects.using("inventory").get(task=REPLY_TASK)
    assert broker.queue[0]["id"] == str(reply.id)
    assert reply.published_at is not None


@pytest.mark.django_db(transaction=True, databases="__all__")
def test_execute_rolls_back_effect_and_reply_together_when_the_transaction_fails(new_saga, monkeypatch):
    """The reply commits with the effect: if the commit never happens, neither exists."""
    saga = new_saga()
    before = world()
    real_write = commands._write_outcomes
    calls = []

    def write_then_crash(service, actions, replies):
        calls.append([reply.payload["status"] for reply in replies])
        real_write(service, actions, replies)  # the barrier row and the reply are written ...
        raise ConnectionError("database went away before commit")  # ... and never committed

    monkeypatch.setattr(commands, "_write_outcomes", write_then_crash)

    outcome = saga.execute("reserve")

    assert outcome["status"] == "transient_error"
    assert calls == [["succeeded"]]  # the transient error's reply is written on its own
    assert world() == before
    assert barrier_rows("inventory", saga.id) == {}
    assert [r["status"] for r in replies("inventory")] == ["transient_error"]


@pytest.mark.django_db(transaction=True, databases="__all__")
@pytest.mark.parametrize(
    ("items", "status"),
    [
        ([{"sku": "SKU-BOOK", "quantity": 3}], "succeeded"),
        # SKU-BOOK (taken first) fits, SKU-LAMP does not: the run with no savepoint rolls back,
        # and the run again in the barrier's savepoint stores the failure.
        ([{"sku": "SKU-LAMP", "quantity": 11}, {"sku": "SKU-BOOK", "quantity": 3}], "business_failure"),
    ],
)
def test_a_service_function_run_by_the_barrier_opens_no_savepoint_of_its_own(new_saga, items, status):
    """`reservation_reserve` is all or nothing by its own transaction; inside the barrier it
    joins the command's (`barrier.atomic`): the only savepoint is the barrier's, and only on the
    business failure's second run."""
    from django.test.utils import CaptureQueriesContext

    saga = new_saga(items=items)
    before = world()

    with CaptureQueriesContext(connections["inventory"]) as queries:
        outcome = saga.execute("reserve")

    assert outcome["status"] == status
    savepoints = [q["sql"] for q in queries.captured_queries if q["sql"].startswith("SAVEPOINT")]
    assert len(savepoints) == (0 if status == "succeeded" else 1)
    if status == "business_failure":
        assert world() == before  # SKU-BOOK's reservation went with the failure
        assert barrier_rows("inventory", saga.id)[("reserve_stock", ACTION)] == outcome


def test_a_service_function_called_inside_another_transaction_keeps_its_savepoint(new_saga):
    """Called outside the barrier (the admin, the API), a failing service function rolls back
    only its own writes, and the caller's transaction goes on."""
    from django.db import transaction

    from inventory.exceptions import InsufficientStock
    from inventory.services import reservation_reserve

    saga = new_saga()
    before = world()
    with transaction.atomic(using="inventory"):
        with pytest.raises(InsufficientStock):
            reservation_reserve(
                saga_id=saga.id,
                order_id=uuid.UUID(saga.context["order_id"]),
                lines=[{"sku": "SKU-LAMP", "quantity": 11}, {"sku": "SKU-BOOK", "quantity": 3}],
            )
        # Still usable: the function's savepoint took its partial reservation back.
        assert StockItem.objects.using("inventory").get(sku="SKU-BOOK").reserved == 0
    assert world() == before


# --- a choreographed give-up's undo (`call(unless_answered=True)`) -----------------------------


def give_up_undo(saga: SagaContext) -> dict:
    """The undo a reaction that ran out of attempts makes of its own step (reserve_stock's)."""
    command = commands.Command.from_message(saga.message("release"))
    with transaction.atomic(using="inventory"):
        return barrier.call(
            using="inventory",
            command=command,
            fn=commands.get_operation("inventory", "release"),
            unless_answered=True,
        )


def test_a_give_up_leaves_an_action_that_answered_on_its_own(new_saga):
    saga = new_saga()
    assert saga.run("reserve")["status"] == "succeeded"
    before = world()
    hits = metrics.BARRIER_HITS.labels("inventory", "action_answered")
    counted = hits._value.get()

    assert give_up_undo(saga) is barrier.ACTION_ANSWERED
    assert hits._value.get() == counted + 1

    assert world() == before  # still reserved
    assert not Barrier.objects.using("inventory").filter(saga_id=saga.id, op=COMPENSATE).exists()


def test_a_give_up_undoes_an_action_whose_outcome_it_settled(new_saga):
    """An outcome `settle` stored (the action took effect outside and never recorded it) is no
    answer of the action's own: the give-up undoes it."""
    saga = new_saga()
    assert saga.run("reserve")["status"] == "succeeded"
    Barrier.objects.using("inventory").filter(saga_id=saga.id, op=ACTION).update(outcome=None)
    assert barrier.settle(using="inventory", saga_id=saga.id, step="reserve_stock", outcome={"status": "succeeded"})

    undone = give_up_undo(saga)

    assert undone["status"] == "succeeded"
    assert "barrier" not in undone
    assert [state for *_, state in world()["reservations"]] == ["released"]


def test_a_give_up_before_the_action_is_a_null_compensation(new_saga):
    saga = new_saga()

    assert give_up_undo(saga) == NULL_COMPENSATION
    assert saga.run("reserve") == {**REFUSED, "replayed": True}


def held_open(run, probe) -> tuple:
    """`run()` in an inventory transaction that one thread holds open, then `probe()` in another:
    the probe must wait for the run's commit. Returns both results."""
    ran, finish = threading.Event(), threading.Event()

    def hold():
        try:
            with transaction.atomic(using="inventory"):
                outcome = run()
                ran.set()
                assert finish.wait(30)
            return outcome
        finally:
            connections.close_all()

    def ask():
        try:
            return probe()
        finally:
            connections.close_all()

    with ThreadPoolExecutor(max_workers=2) as pool:
        acted = pool.submit(hold)
        assert ran.wait(30)
        asked = pool.submit(ask)
        with pytest.raises(TimeoutError):
            asked.result(timeout=0.5)  # held by the run's row
        finish.set()
        return acted.result(timeout=30), asked.result(timeout=30)


@pytest.mark.django_db(transaction=True, databases="__all__")
@pytest.mark.skipif(not ON_POSTGRES, reason="row locks")
def test_a_give_up_waits_for_a_run_of_the_action_still_in_flight(new_saga):
    """The action's row is there with no outcome yet (an intent `begin` committed) and another
    delivery is running the action: the give-up waits for it, then leaves its answer be."""
    saga = new_saga()
    action = commands.Command.from_message(saga.message("reserve"))
    with transaction.atomic(using="inventory"):
        assert barrier.begin(using="inventory", command=action) is None
    reserve = commands.get_operation("inventory", "reserve")

    acted, undone = held_open(
        lambda: barrier.call(using="inventory", command=action, fn=reserve, begun=True), lambda: give_up_undo(saga)
    )

    assert acted["status"] == "succeeded"
    assert undone is barrier.ACTION_ANSWERED
    assert [state for *_, state in world()["reservations"]] == ["held"]  # not released


def test_answered_decides_nothing_for_an_action_with_no_row(new_saga):
    saga = new_saga()
    with transaction.atomic(using="inventory"):
        assert barrier.answered(using="inventory", saga_id=saga.id, step="reserve_stock") is False

    assert not Barrier.objects.using("inventory").filter(saga_id=saga.id).exists()  # its wait left no row
    assert saga.run("reserve")["status"] == "succeeded"  # and the action still runs
    hits = metrics.BARRIER_HITS.labels("inventory", "action_answered")
    counted = hits._value.get()
    with transaction.atomic(using="inventory"):
        assert barrier.answered(using="inventory", saga_id=saga.id, step="reserve_stock") is True
    assert hits._value.get() == counted + 1


@pytest.mark.django_db(transaction=True, databases="__all__")
@pytest.mark.skipif(not ON_POSTGRES, reason="row locks")
def test_answered_waits_for_a_run_still_inserting_the_actions_row(new_saga):
    """A reaction with no undo gives up while another delivery's run has inserted the action's
    row and not committed: a plain read would not see that row, and the give-up would tell the
    tracker the step failed just before the run announces its success."""
    saga = new_saga()
    action = commands.Command.from_message(saga.message("reserve"))
    reserve = commands.get_operation("inventory", "reserve")

    def ask() -> bool:
        with transaction.atomic(using="inventory"):
            return barrier.answered(using="inventory", saga_id=saga.id, step="reserve_stock")

    acted, asked = held_open(lambda: barrier.call(using="inventory", command=action, fn=reserve), ask)

    assert acted["status"] == "succeeded"
    assert asked is True
