"""Charges, refunds and the append-only ledger, against the simulated card gateway."""

from __future__ import annotations

import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from decimal import Decimal

import pytest
from django.db import IntegrityError, connections, transaction
from django.db.models.query import QuerySet
from django.test.utils import CaptureQueriesContext

from payments import gateway, selectors
from payments.exceptions import CardDeclined, GatewayUnavailable
from payments.models import Charge, LedgerEntry
from payments.services import charge_begin, charge_create, charge_undo_call, payment_method_add
from payments.services import charge_refund as record_refund
from sagaplatform.kernel import commands
from sagaplatform.kernel.models import Barrier

pytestmark = pytest.mark.django_db(databases="__all__")

DB = "payments"


def money() -> dict:
    """Every charge and ledger entry, to show that a failure left nothing behind."""
    return {
        "charges": sorted(Charge.objects.using(DB).values_list("saga_id", "amount", "state")),
        "ledger": sorted(LedgerEntry.objects.using(DB).values_list("charge__saga_id", "kind", "amount")),
    }


NOTHING: dict[str, list[object]] = {"charges": [], "ledger": []}


def declined_only() -> dict:
    """The gateway's refusal recorded as the only charge, and no money moved."""
    (saga_id,) = Charge.objects.using(DB).values_list("saga_id", flat=True)
    return {"charges": [(saga_id, Decimal("25.00"), "declined")], "ledger": []}


def charge(*, token: str = "tok_visa", amount: str = "25.00", saga_id=None, order_id=None, attempt: int = 1):
    return charge_create(
        saga_id=saga_id or uuid.uuid4(),
        order_id=order_id or uuid.uuid4(),
        amount=Decimal(amount),
        currency="EUR",
        token=token,
        attempt=attempt,
    )


def charge_refund(*, saga_id):
    """A refund as its operation runs it: confirmed by the gateway, then recorded."""
    charge_undo_call(saga_id=saga_id, step="charge_payment", attempt=1)
    return record_refund(saga_id=saga_id)


def command(operation: str, *, saga_id, op: str = "action", attempt: int = 1, **payload) -> dict:
    return commands.Command(
        saga_id=saga_id, step="charge_payment", op=op, operation=operation, attempt=attempt, payload=payload
    ).to_message()


def charge_command(*, saga_id, token: str = "tok_visa", amount: str = "25.00", attempt: int = 1, order_id=None):
    return command(
        "charge",
        saga_id=saga_id,
        attempt=attempt,
        order_id=str(order_id or uuid.uuid4()),
        amount=amount,
        currency="EUR",
        payment_method=payment_method_add(token=token),
    )


# --- charge ------------------------------------------------------------------------------------


def test_a_good_card_is_charged_and_the_ledger_records_it():
    saga_id, order_id = uuid.uuid4(), uuid.uuid4()

    result = charge(saga_id=saga_id, order_id=order_id, amount="19.99")

    stored = Charge.objects.using(DB).get(saga_id=saga_id)
    assert stored.id == result.id
    assert (stored.order_id, stored.amount, stored.currency, stored.state) == (
        order_id,
        Decimal("19.99"),
        "EUR",
        "captured",
    )
    assert stored.gateway_reference == gateway.reference_for(f"{saga_id}:charge")
    assert list(LedgerEntry.objects.using(DB).filter(charge=stored).values_list("kind", "amount")) == [
        ("charge", Decimal("19.99"))
    ]
    assert selectors.net_for_order(order_id=order_id) == Decimal("19.99")


def test_amounts_stay_exact_decimals_end_to_end():
    """0.1 + 0.2 is 0.30 in money, not 0.30000000000000004."""
    saga_id, order_id = uuid.uuid4(), uuid.uuid4()

    outcome = commands.run(service=DB, message=charge_command(saga_id=saga_id, amount="0.30", order_id=order_id))
    other = charge(amount="0.10", order_id=order_id)

    assert outcome["result"]["amount"] == "0.30"
    stored = Charge.objects.using(DB).get(saga_id=saga_id)
    assert isinstance(stored.amount, Decimal)
    assert stored.amount == Decimal("0.10") + Decimal("0.20")
    assert isinstance(other.amount, Decimal)
    total = selectors.net_for_order(order_id=order_id)
    assert isinstance(total, Decimal)
    assert total == Decimal("0.40")


def test_the_charge_operation_answers_with_the_charge():
    saga_id = uuid.uuid4()

    outcome = commands.run(service=DB, message=charge_command(saga_id=saga_id, amount="42.50"))

    stored = Charge.objects.using(DB).get(saga_id=saga_id)
    assert outcome == {
        "status": "succeeded",
        "result": {"charge_id": str(stored.id), "amount": "42.50", "reference": stored.gateway_reference},
    }


def test_a_saga_cannot_be_charged_twice_even_bypassing_the_barrier():
    saga_id = uuid.uuid4()
    first = charge(saga_id=saga_id)
    before = money()

    again = charge(saga_id=saga_id, attempt=2)  # the intent is found again: no second call's charge
    with pytest.raises(IntegrityError), transaction.atomic(using=DB):
        Charge.objects.using(DB).create(saga_id=saga_id, order_id=uuid.uuid4(), amount=Decimal("1.00"))

    assert again.id == first.id
    assert money() == before
    assert LedgerEntry.objects.using(DB).count() == 1


def test_an_intent_begun_again_is_one_statement_and_leaves_the_first_as_it_was():
    saga_id, order_id = uuid.uuid4(), uuid.uuid4()
    with transaction.atomic(using=DB):
        charge_begin(saga_id=saga_id, order_id=order_id, amount=Decimal("12.50"), currency="EUR", token="tok_visa")
    with transaction.atomic(using=DB), CaptureQueriesContext(connections[DB]) as queries:
        charge_begin(saga_id=saga_id, order_id=uuid.uuid4(), amount=Decimal("99.00"), currency="USD", token="tok_x")
    assert len(queries) == 1  # INSERT ... ON CONFLICT DO NOTHING, no read and no savepoint
    stored = Charge.objects.using(DB).get(saga_id=saga_id)
    assert (stored.order_id, stored.amount, stored.currency, stored.payment_token, stored.state) == (
        order_id,
        Decimal("12.50"),
        "EUR",
        "tok_visa",
        Charge.State.PENDING,
    )
    assert stored.idempotency_key == f"{saga_id}:charge"


def test_any_other_well_formed_token_behaves_like_a_good_card():
    saga_id = uuid.uuid4()

    charge(saga_id=saga_id, token="tok_mastercard")

    assert Charge.objects.using(DB).get(saga_id=saga_id).state == Charge.State.CAPTURED


# --- the gateway's test cards ------------------------------------------------------------------


def test_a_declined_card_is_a_business_failure_and_takes_no_money():
    with pytest.raises(CardDeclined) as declined:
        charge(token="tok_declined")

    assert declined.value.code == "card_declined"
    assert declined.value.details == {"decline_code": "generic_decline"}
    assert money() == declined_only()


def test_a_declined_card_through_the_operation_is_stored_as_a_failure_with_no_money():
    saga_id = uuid.uuid4()

    outcome = commands.run(service=DB, message=charge_command(saga_id=saga_id, token="tok_declined"))

    assert outcome["status"] == "business_failure"
    assert outcome["error"]["code"] == "card_declined"
    assert money() == declined_only()
    assert Barrier.objects.using(DB).get(saga_id=saga_id).outcome == outcome


@pytest.mark.parametrize(
    ("token", "failures"), [("tok_flaky", 2), ("tok_flaky_1", 1), ("tok_flaky_3", 3), ("tok_flaky_0", 0)]
)
def test_a_flaky_card_fails_transiently_n_times_then_succeeds(token, failures):
    saga_id = uuid.uuid4()

    for attempt in range(1, failures + 1):
        with pytest.raises(GatewayUnavailable) as unavailable:
            charge(saga_id=saga_id, token=token, attempt=attempt)
        assert unavailable.value.code == "gateway_unavailable"
        assert money() == {"charges": [(saga_id, Decimal("25.00"), "pending")], "ledger": []}

    result = charge(saga_id=saga_id, token=token, attempt=failures + 1)

    assert result.state == Charge.State.CAPTURED
    assert Charge.objects.using(DB).filter(saga_id=saga_id).count() == 1
    assert LedgerEntry.objects.using(DB).count() == 1


def test_a_flaky_card_through_the_operation_leaves_only_its_intent_until_it_succeeds():
    saga_id = uuid.uuid4()

    with pytest.raises(GatewayUnavailable):
        commands.run(service=DB, message=charge_command(saga_id=saga_id, token="tok_flaky_1", attempt=1))
    # The intent committed before the call: a pending barrier row and a pending charge, no money.
    assert Barrier.objects.using(DB).get(saga_id=saga_id).outcome is None
    assert money() == {"charges": [(saga_id, Decimal("25.00"), "pending")], "ledger": []}

    outcome = commands.run(service=DB, message=charge_command(saga_id=saga_id, token="tok_flaky_1", attempt=2))

    assert outcome["status"] == "succeeded"
    assert Charge.objects.using(DB).filter(saga_id=saga_id).count() == 1


def test_a_hanging_card_blocks_for_the_configured_time_then_succeeds(settings):
    settings.PAYMENT_GATEWAY_HANG_SECONDS = 0.3
    saga_id = uuid.uuid4()

    started = time.monotonic()
    result = charge(saga_id=saga_id, token="tok_hang")
    elapsed = time.monotonic() - started

    assert 0.3 <= elapsed < 5
    assert result.state == Charge.State.CAPTURED
    assert Charge.objects.using(DB).filter(saga_id=saga_id).count() == 1


def test_the_gateway_reference_is_derived_from_the_idempotency_key():
    """A retry after a crash between the gateway's answer and our commit gets the same reference."""
    first = gateway.charge(token="tok_visa", amount=Decimal("5.00"), idempotency_key="saga-1:charge", attempt=1)
    again = gateway.charge(token="tok_visa", amount=Decimal("5.00"), idempotency_key="saga-1:charge", attempt=2)
    other = gateway.charge(token="tok_visa", amount=Decimal("5.00"), idempotency_key="saga-2:charge", attempt=1)

    assert first.reference == again.reference
    assert first.reference != other.reference
    assert first.reference.startswith("ch_")


# --- refund and the ledger ---------------------------------------------------------------------


def test_a_refund_appends_a_reverse_entry_and_nets_to_zero():
    saga_id, order_id = uuid.uuid4(), uuid.uuid4()
    original = charge(saga_id=saga_id, order_id=order_id, amount="30.00")
    charge_entry = LedgerEntry.objects.using(DB).values().get(charge=original, kind="charge")

    refunded = charge_refund(saga_id=saga_id)

    assert refunded.id == original.id
    assert refunded.state == Charge.State.REFUNDED
    assert Charge.objects.using(DB).get(id=original.id).state == Charge.State.REFUNDED
    entries = list(LedgerEntry.objects.using(DB).filter(charge=original).order_by("id").values_list("kind", "amount"))
    assert entries == [("charge", Decimal("30.00")), ("refund", Decimal("-30.00"))]
    assert selectors.net_for_order(order_id=order_id) == Decimal("0.00")
    # Append-only: the charge entry is exactly as it was.
    assert LedgerEntry.objects.using(DB).values().get(charge=original, kind="charge") == charge_entry


def test_refunding_twice_refunds_once():
    saga_id, order_id = uuid.uuid4(), uuid.uuid4()
    charge(saga_id=saga_id, order_id=order_id, amount="30.00")
    charge_refund(saga_id=saga_id)
    before = money()

    again = charge_refund(saga_id=saga_id)

    assert again.state == Charge.State.REFUNDED
    assert money() == before
    assert LedgerEntry.objects.using(DB).filter(kind="refund").count() == 1
    assert selectors.net_for_order(order_id=order_id) == Decimal("0.00")


def test_the_refund_operation_twice_without_the_barrier_refunds_once():
    """Two different steps (say a compensation and an operator's refund), so the barrier does not
    dedupe them: the conditional update on the charge's state does."""
    saga_id = uuid.uuid4()
    charge(saga_id=saga_id, amount="12.00")

    first = commands.run(service=DB, message={**command("refund", saga_id=saga_id), "step": "refund_a"})
    second = commands.run(service=DB, message={**command("refund", saga_id=saga_id), "step": "refund_b"})

    assert first == {"status": "succeeded", "result": {"refunded": "12.00"}}
    assert second["status"] == "succeeded"
    assert "replayed" not in second
    assert sorted(LedgerEntry.objects.using(DB).values_list("kind", "amount")) == [
        ("charge", Decimal("12.00")),
        ("refund", Decimal("-12.00")),
    ]


def test_refunding_a_saga_that_was_never_charged_does_nothing():
    charge(amount="9.00")  # someone else's charge
    before = money()

    assert charge_refund(saga_id=uuid.uuid4()) is None
    # As an action of its own step (not a compensation, which the barrier would null first).
    outcome = commands.run(service=DB, message={**command("refund", saga_id=uuid.uuid4()), "step": "refund_payment"})

    assert outcome["result"] == {"refunded": "0.00"}
    assert money() == before


def test_the_ledger_refuses_a_second_entry_of_the_same_kind():
    original = charge(amount="10.00")
    charge_refund(saga_id=original.saga_id)

    with pytest.raises(IntegrityError), transaction.atomic(using=DB):
        LedgerEntry.objects.using(DB).create(charge=original, kind=LedgerEntry.Kind.REFUND, amount=Decimal("-10.00"))

    assert LedgerEntry.objects.using(DB).filter(charge=original).count() == 2


def test_net_for_order_sums_only_that_order():
    order, other = uuid.uuid4(), uuid.uuid4()
    kept = charge(order_id=order, amount="10.00")
    refunded = charge(order_id=order, amount="2.50")
    charge(order_id=other, amount="99.99")

    charge_refund(saga_id=refunded.saga_id)

    assert selectors.net_for_order(order_id=order) == kept.amount == Decimal("10.00")
    assert selectors.net_for_order(order_id=other) == Decimal("99.99")
    assert selectors.net_for_order(order_id=uuid.uuid4()) == Decimal("0.00")


@pytest.mark.postgres
@pytest.mark.django_db(transaction=True, databases="__all__")
def test_concurrent_refunds_of_one_charge_refund_once():
    """Without the barrier (two different steps, say): the conditional state update decides."""
    saga_id, order_id = uuid.uuid4(), uuid.uuid4()
    charge(saga_id=saga_id, order_id=order_id, amount="30.00")
    count = 8
    start = threading.Barrier(count, timeout=30)

    def refund(_):
        try:
            start.wait()
            charge_refund(saga_id=saga_id)
            return "ok"
        except Exception as exc:
            return repr(exc)
        finally:
            connections.close_all()

    with ThreadPoolExecutor(max_workers=count) as pool:
        results = list(pool.map(refund, range(count)))

    assert results == ["ok"] * count
    assert LedgerEntry.objects.using(DB).filter(kind="refund").count() == 1
    assert Charge.objects.using(DB).get(saga_id=saga_id).state == Charge.State.REFUNDED
    assert selectors.net_for_order(order_id=order_id) == Decimal("0.00")


def test_a_refund_that_lost_the_race_reports_the_charge_as_refunded(monkeypatch):
    saga_id = uuid.uuid4()
    original = charge(saga_id=saga_id, amount="30.00")
    real_first = QuerySet.first
    raced = []

    def first_then_a_rival_refunds(self):
        row = real_first(self)
        if self.model is Charge and row is not None and not raced:
            raced.append(row.id)  # another worker refunds between our read and our update
            Charge.objects.using(DB).filter(id=row.id).update(state=Charge.State.REFUNDED)
            LedgerEntry.objects.using(DB).create(charge=row, kind=LedgerEntry.Kind.REFUND, amount=-row.amount)
        return row

    charge_undo_call(saga_id=saga_id, step="charge_payment", attempt=1)
    monkeypatch.setattr(QuerySet, "first", first_then_a_rival_refunds)

    result = record_refund(saga_id=saga_id)

    assert raced == [original.id]
    assert LedgerEntry.objects.using(DB).filter(kind="refund").count() == 1  # refunded once: no harm done
    assert result.state == Charge.State.REFUNDED  # ...but the answer says it is still captured


# --- the gateway is called outside the database transaction ------------------------------------


class Crash(BaseException):
    """Stands for SIGKILL: no `except Exception` catches it, and nothing after it runs."""


@pytest.fixture
def calls(monkeypatch):
    """Every gateway call, with what a second connection could see at that moment."""
    seen = []
    real_charge, real_refund = gateway.charge, gateway.refund

    def committed(saga_id) -> tuple:
        found = []

        def look():
            try:
                charge = Charge.objects.using(DB).filter(saga_id=saga_id).values_list("state", "idempotency_key")
                rows = Barrier.objects.using(DB).filter(saga_id=saga_id, op="action").values_list("outcome", flat=True)
                found.append((list(charge), list(rows)))
            finally:
                connections.close_all()

        thread = threading.Thread(target=look)
        thread.start()
        thread.join()
        return found[0]

    def charge(**kwargs):
        saga_id = kwargs["idempotency_key"].split(":")[0]
        seen.append(("charge", kwargs["idempotency_key"], connections[DB].in_atomic_block, committed(saga_id)))
        return real_charge(**kwargs)

    def refund(**kwargs):
        seen.append(("refund", kwargs["reference"], connections[DB].in_atomic_block, None))
        return real_refund(**kwargs)

    monkeypatch.setattr(gateway, "charge", charge)
    monkeypatch.setattr(gateway, "refund", refund)
    return seen


@pytest.fixture
def crash_after_call(monkeypatch):
    """Crash once at the `after_call` point: the gateway answered, nothing recorded yet."""
    from sagaplatform.kernel import faults

    real = faults.crash_if
    crashed = []

    def crash_if(point, service, operation):
        if point == "after_call" and not crashed:
            crashed.append((service, operation))
            raise Crash
        return real(point, service, operation)

    monkeypatch.setattr(faults, "crash_if", crash_if)
    return crashed


@pytest.mark.django_db(transaction=True, databases="__all__")
def test_the_gateway_is_called_with_no_transaction_open_after_the_intent_committed(calls):
    saga_id = uuid.uuid4()

    outcome = commands.execute(service=DB, message=charge_command(saga_id=saga_id))

    assert outcome["status"] == "succeeded"
    key = f"{saga_id}:charge"
    # Another connection already saw the pending charge and its barrier row (no outcome yet).
    assert calls == [("charge", key, False, ([("pending", key)], [None]))]
    assert money() == {
        "charges": [(saga_id, Decimal("25.00"), "captured")],
        "ledger": [(saga_id, "charge", Decimal("25.00"))],
    }


@pytest.mark.django_db(transaction=True, databases="__all__")
def test_a_refund_calls_the_gateway_with_no_transaction_open(calls):
    saga_id = uuid.uuid4()
    commands.execute(service=DB, message=charge_command(saga_id=saga_id))

    undone = commands.execute(service=DB, message=command("refund", saga_id=saga_id, op="compensate"))

    assert undone == {"status": "succeeded", "result": {"refunded": "25.00"}}
    assert [(kind, in_transaction) for kind, _, in_transaction, _ in calls] == [("charge", False), ("refund", False)]
    assert Charge.objects.using(DB).get(saga_id=saga_id).refund_reference.startswith("re_")


def test_a_crash_between_the_gateway_call_and_the_record_ends_with_exactly_one_charge(calls, crash_after_call):
    saga_id = uuid.uuid4()

    with pytest.raises(Crash):
        commands.execute(service=DB, message=charge_command(saga_id=saga_id))
    # The gateway took the card; we only know we asked.
    assert money() == {"charges": [(saga_id, Decimal("25.00"), "pending")], "ledger": []}

    redelivered = commands.execute(service=DB, message=charge_command(saga_id=saga_id))

    assert redelivered["status"] == "succeeded"
    assert "replayed" not in redelivered
    # Asked twice with one key: the gateway answered the same charge.
    assert [key for _, key, _, _ in calls] == [f"{saga_id}:charge"] * 2
    assert redelivered["result"]["reference"] == gateway.reference_for(f"{saga_id}:charge")
    assert money() == {
        "charges": [(saga_id, Decimal("25.00"), "captured")],
        "ledger": [(saga_id, "charge", Decimal("25.00"))],
    }
    assert Barrier.objects.using(DB).get(saga_id=saga_id).outcome == redelivered


def test_a_refund_that_finds_the_charge_pending_finishes_it_then_undoes_it(calls, crash_after_call):
    """The action crashed after the gateway took the card; the orchestrator gave up on it and
    compensates. The refund asks the gateway what it took under the charge's key (a lookup, not
    a second charge), records it and its action's outcome, then refunds: no money kept, and a
    late action is a replay."""
    saga_id = uuid.uuid4()
    with pytest.raises(Crash):
        commands.execute(service=DB, message=charge_command(saga_id=saga_id))

    undone = commands.execute(service=DB, message=command("refund", saga_id=saga_id, op="compensate", attempt=1))
    late = commands.execute(service=DB, message=charge_command(saga_id=saga_id, attempt=2))

    assert undone == {"status": "succeeded", "result": {"refunded": "25.00"}}
    assert late["status"] == "succeeded"
    assert late["replayed"] is True
    assert [kind for kind, *_ in calls] == ["charge", "refund"]
    assert money() == {
        "charges": [(saga_id, Decimal("25.00"), "refunded")],
        "ledger": [(saga_id, "charge", Decimal("25.00")), (saga_id, "refund", Decimal("-25.00"))],
    }
    rows = dict(Barrier.objects.using(DB).filter(saga_id=saga_id).values_list("op", "outcome"))
    assert rows["action"]["status"] == rows["compensate"]["status"] == "succeeded"


def test_an_action_refused_by_its_compensation_never_calls_the_gateway(calls):
    saga_id = uuid.uuid4()

    nulled = commands.execute(service=DB, message=command("refund", saga_id=saga_id, op="compensate"))
    late = commands.execute(service=DB, message=charge_command(saga_id=saga_id))

    assert nulled["barrier"] == "null_compensation"
    assert late["error"]["code"] == "compensated_before_action"
    assert calls == []
    assert money() == NOTHING
