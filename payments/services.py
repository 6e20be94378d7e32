"""Charge, capture, void and refund.

The gateway is never called inside a transaction: a slow gateway (`tok_hang`) would hold the
payments transaction, and on SQLite the whole database's write lock, while it answers. A charge
is an intent committed first (`charge_begin`: a `pending` charge with its idempotency key), a
call with no transaction open (`charge_call`), and the answer recorded in a second transaction.
A refund is the same: the gateway confirms it (`charge_undo_call`), then the ledger records it.
The barrier's operations (`charge_outcome`, `charge_refund`, ...) only read and write the
database."""

from __future__ import annotations

import uuid
from decimal import Decimal
from typing import Any

from django.conf import settings
from django.db import connections, transaction
from django.db.models import F
from django.utils import timezone

from sagaplatform.kernel import barrier, breakers, faults, outbox, sealing
from sagaplatform.kernel.clock import db_now
from sagaplatform.kernel.models import FaultRule

from . import gateway
from .exceptions import (
    CardDeclined,
    ChargeCancelled,
    GatewayUnavailable,
    PaymentMethodPending,
    PaymentMethodUnknown,
    PaymentNotCapturable,
)
from .models import Charge, LedgerEntry, PaymentMethod

DB = "payments"
DECLINED_MESSAGE = "The card was declined"
CANCELLED_MESSAGE = "The charge was given up before the gateway took anything"
REFUND_AT_GATEWAY_TASK = "payments.refund_at_gateway"


def payment_method_register(*, reference: str, sealed_token: str, order_id=None) -> None:
    """Keep the card token under its reference (the orders service's registration message).

    Idempotent by reference: a redelivered registration changes nothing, and one that arrives
    after a charge already waited for it fills in the awaited row. A registration whose seal does
    not open is refused (`InvalidToken`): the message was not sealed with our key.

    One statement, in autocommit: insert the row, or fill in the token of an awaited one (a row
    that has a token keeps it)."""
    token = sealing.unseal(sealed_token)
    connection = connections[DB]
    quote = connection.ops.quote_name
    fields = {f.name: f for f in PaymentMethod._meta.concrete_fields}
    table = quote(PaymentMethod._meta.db_table)
    columns = ("reference", "token", "order_id", "registered_at")
    values = [
        fields[name].get_db_prep_save(value, connection)
        for name, value in zip(columns, (reference, token, order_id, timezone.now()), strict=True)
    ]
    filled = ", ".join(f"{quote(c)} = EXCLUDED.{quote(c)}" for c in columns[1:])
    # Only quoted identifiers from the model are interpolated; every value is a parameter.
    sql = (
        f"INSERT INTO {table} ({', '.join(quote(c) for c in columns)}) VALUES (%s, %s, %s, %s)"  # noqa: S608
        f" ON CONFLICT ({quote('reference')}) DO UPDATE SET {filled} WHERE {table}.{quote('token')} = ''"
    )
    with connection.cursor() as cursor:
        cursor.execute(sql, values)


def payment_method_add(*, token: str, order_id=None) -> str:
    """Register a card directly, for tools and tests (orders send a sealed registration
    instead). Returns its new reference."""
    reference = f"pm_{uuid.uuid4().hex}"
    PaymentMethod.objects.using(DB).create(
        reference=reference, token=token, order_id=order_id, registered_at=timezone.now()
    )
    return reference


def payment_method_token(*, reference: str) -> str:
    """The card token registered under `reference`, or "" if it is not registered (yet).

    A miss is remembered (`awaited_at`, on the database clock, in its own committed
    transaction), so a later attempt knows how long the charge has waited for it. A charge that
    names no reference at all can never find one: a business failure at once."""
    if not isinstance(reference, str) or not reference:
        raise PaymentMethodUnknown("The charge names no payment method", details={"payment_method": reference})
    method = PaymentMethod.objects.using(DB).filter(reference=reference).first()
    if method is not None and method.token:
        return method.token
    if method is None:
        with transaction.atomic(using=DB):
            PaymentMethod.objects.using(DB).get_or_create(reference=reference, defaults={"awaited_at": db_now(DB)})
    return ""


def payment_method_registered(*, reference: Any) -> bool:
    """Whether a card token is registered under `reference` (read only). A charge naming no
    reference counts as registered: it fails at once, wherever it runs."""
    if not isinstance(reference, str) or not reference:
        return True
    return PaymentMethod.objects.using(DB).filter(reference=reference).exclude(token="").exists()


def payment_method_missing(*, reference: str, attempt: int) -> None:
    """A charge found no intent: if its payment method is not registered, raise what that means
    (read only).

    Transient (`payment_method_pending`, retried) while the registration may still be on its
    way; a business failure (`payment_method_unknown`) once the charge has waited
    `PAYMENT_METHOD_WAIT_SECONDS` for it or reached attempt `PAYMENT_METHOD_WAIT_ATTEMPTS`."""
    method = PaymentMethod.objects.using(DB).filter(reference=reference).first()
    if method is not None and method.token:
        return  # registered: the charge itself is what is missing (its call was not made)
    details = {"payment_method": reference}
    waited = (db_now(DB) - method.awaited_at).total_seconds() if method and method.awaited_at else 0.0
    if waited >= settings.PAYMENT_METHOD_WAIT_SECONDS or attempt >= settings.PAYMENT_METHOD_WAIT_ATTEMPTS:
        raise PaymentMethodUnknown(f"No payment method is registered as {reference}", details=details)
    raise PaymentMethodPending(f"The payment method {reference} is not registered yet", details=details)


def idempotency_key(saga_id: uuid.UUID) -> str:
    return f"{saga_id}:charge"


def charge_begin(
    *, saga_id: uuid.UUID, order_id: uuid.UUID, amount: Decimal, currency: str, token: str, capture: bool = True
) -> None:
    """Record the intent to charge, inside the caller's transaction. Idempotent: one INSERT ...
    ON CONFLICT DO NOTHING, so a charge already begun for the saga (an earlier attempt's) is
    left as it is, where get_or_create took a read, a savepoint and the insert."""
    intent = Charge(
        saga_id=saga_id,
        order_id=order_id,
        amount=amount,
        currency=currency,
        state=Charge.State.PENDING,
        idempotency_key=idempotency_key(saga_id),
        payment_token=token,
        capture=capture,
    )
    Charge.objects.using(DB).bulk_create([intent], ignore_conflicts=True)


def charge_call(*, saga_id: uuid.UUID, attempt: int, operation: str = "charge") -> Charge | None:
    """Ask the gateway about a pending charge and record its answer. Run with no transaction open.

    The call always carries the charge's idempotency key: after a crash between the call and the
    record, the next call gets the same charge back instead of a second one."""
    charge = Charge.objects.using(DB).filter(saga_id=saga_id).first()
    if charge is None:
        return None
    pending = Charge.objects.using(DB).filter(id=charge.id, state=Charge.State.PENDING)
    if charge.state == Charge.State.PENDING and not breakers.admit(breakers.GATEWAY).admitted:
        # The gateway's circuit breaker is open: do not call it; a transient error, retried later.
        raise GatewayUnavailable("The payment gateway's circuit breaker is open; it was not called")
    # Counted before the call, and only while pending: once a compensation has cancelled the
    # charge, no call starts.
    if not pending.update(calls_in_doubt=F("calls_in_doubt") + 1):
        charge.refresh_from_db(using=DB)
        return charge
    try:
        result = gateway.charge(
            token=charge.payment_token, amount=charge.amount, idempotency_key=charge.idempotency_key, attempt=attempt
        )
        breakers.record(breakers.GATEWAY, True)
    except GatewayUnavailable:
        breakers.record(breakers.GATEWAY, False)
        # A definite "not processed, try again": this call took nothing.
        Charge.objects.using(DB).filter(id=charge.id, calls_in_doubt__gt=0).update(
            calls_in_doubt=F("calls_in_doubt") - 1
        )
        raise
    except CardDeclined as exc:
        breakers.record(breakers.GATEWAY, True)  # a refusal is an answer: the gateway works
        faults.crash_if(FaultRule.CrashPoint.AFTER_CALL, DB, operation)
        pending.update(
            state=Charge.State.DECLINED,
            decline_code=exc.details.get("decline_code", ""),
            payment_token="",
            updated_at=timezone.now(),
        )
    else:
        faults.crash_if(FaultRule.CrashPoint.AFTER_CALL, DB, operation)
        with transaction.atomic(using=DB):
            _record_taken(charge, result.reference)
    charge.refresh_from_db(using=DB)
    return charge


def _record_taken(charge: Charge, reference: str) -> None:
    """Record that the gateway took (or, without capture, held) the charge under `reference`.
    Conditional: a concurrent call for the same charge (a duplicate delivery, or a compensation
    finishing it) records it once. Inside the caller's transaction."""
    state = Charge.State.CAPTURED if charge.capture else Charge.State.AUTHORIZED
    pending = Charge.objects.using(DB).filter(id=charge.id, state=Charge.State.PENDING)
    if pending.update(state=state, gateway_reference=reference, payment_token="", updated_at=timezone.now()) and (
        charge.capture
    ):
        LedgerEntry.objects.using(DB).create(charge=charge, kind=LedgerEntry.Kind.CHARGE, amount=charge.amount)


def charge_reconcile(*, saga_id: uuid.UUID) -> Charge | None:
    """A charge still pending: ask the gateway what it took under the charge's idempotency key
    (a read, no new charge) and record it if it took something. Otherwise, if no call could
    have taken anything, cancel it. Inside the caller's transaction, or none."""
    charge = Charge.objects.using(DB).filter(saga_id=saga_id).first()
    if charge is None or charge.state != Charge.State.PENDING:
        return charge
    taken = gateway.find_charge(charge.idempotency_key or idempotency_key(saga_id))
    if taken is not None:
        with transaction.atomic(using=DB):
            _record_taken(charge, taken.reference)
    else:
        charge_abandon(saga_id=saga_id)
    charge.refresh_from_db(using=DB)
    return charge


def _action_outcome(charge: Charge) -> dict | None:
    """The outcome of the charge's action, as its barrier row stores it; None while pending."""
    if charge.state == Charge.State.PENDING:
        return None
    if charge.state == Charge.State.DECLINED:
        return {"status": "business_failure", "error": CardDeclined(DECLINED_MESSAGE).as_dict()}
    if charge.state == Charge.State.CANCELLED:
        return {"status": "business_failure", "error": ChargeCancelled(CANCELLED_MESSAGE).as_dict()}
    return {"status": "succeeded", "result": charge_result(charge)}


def charge_settle(*, saga_id: uuid.UUID, step: str) -> None:
    """Before undoing a charge whose action never stored its outcome (its reaction failed after
    the gateway answered, and gave up): reconcile the charge with the gateway and store the
    action's outcome in its barrier row. A charge the gateway took is then an action to undo
    (refunded, and the audit sees action and compensation); one it never took is a failed
    action, whose compensation is null. Inside the caller's transaction; reads the gateway only."""
    charge = charge_reconcile(saga_id=saga_id)
    outcome = _action_outcome(charge) if charge is not None else None
    if outcome is not None:
        barrier.settle(using=DB, saga_id=saga_id, step=step, outcome=outcome)


def charge_abandon(*, saga_id: uuid.UUID) -> bool:
    """Cancel a pending charge if no call could have taken anything; no call starts after it."""
    return bool(
        Charge.objects.using(DB)
        .filter(saga_id=saga_id, state=Charge.State.PENDING, calls_in_doubt=0)
        .update(state=Charge.State.CANCELLED, payment_token="", updated_at=timezone.now())
    )


def charge_outcome(*, saga_id: uuid.UUID, charge: Charge | None = None) -> Charge:
    """The charge as the gateway answered it (the barrier's operation: reads only). `charge`:
    the saga's charge as the caller has just read it."""
    if charge is None:
        charge = Charge.objects.using(DB).filter(saga_id=saga_id).first()
    if charge is None or charge.state == Charge.State.PENDING:
        raise GatewayUnavailable("The gateway has not answered for this charge yet")
    if charge.state == Charge.State.DECLINED:
        raise CardDeclined(DECLINED_MESSAGE, details={"decline_code": charge.decline_code})
    if charge.state == Charge.State.CANCELLED:
        raise ChargeCancelled(CANCELLED_MESSAGE)
    return charge


def charge_result(charge: Charge) -> dict:
    return {"charge_id": str(charge.id), "amount": str(charge.amount), "reference": charge.gateway_reference}


def charge_create(
    *,
    saga_id: uuid.UUID,
    order_id: uuid.UUID,
    amount: Decimal,
    currency: str,
    token: str,
    attempt: int = 1,
    capture: bool = True,
) -> Charge:
    """Take the money (or, with `capture=False`, only hold it: TCC's try), without the barrier."""
    with transaction.atomic(using=DB):
        charge_begin(saga_id=saga_id, order_id=order_id, amount=amount, currency=currency, token=token, capture=capture)
    charge_call(saga_id=saga_id, attempt=attempt)
    return charge_outcome(saga_id=saga_id)


def charge_undo_call(*, saga_id: uuid.UUID, step: str, attempt: int, operation: str = "refund") -> Charge | None:
    """Before a refund or a void: settle what the gateway owes us. Run with no transaction open.

    A charge still pending is cancelled if no call could have taken anything (every call so far
    was answered "unavailable"). Otherwise (a call in flight, or cut short by a crash) it is
    finished first, asking the gateway again with the same idempotency key. Either way its
    action's barrier row gets the outcome, since the action may never run again. Then a captured
    charge is refunded at the gateway; the refund's own operation records it in the ledger."""
    charge_reconcile(saga_id=saga_id)  # the gateway took it: record it; else cancel it if none can have
    charge = charge_call(saga_id=saga_id, attempt=attempt, operation=operation)
    if charge is None or charge.state == Charge.State.PENDING:
        return charge
    outcome = _action_outcome(charge)
    if outcome is not None:
        barrier.settle(using=DB, saga_id=saga_id, step=step, outcome=outcome)
    if charge.state in (Charge.State.CAPTURED, Charge.State.REFUNDED) and charge.refund_reference is None:
        refund_at_gateway(charge=charge, operation=operation)
        charge.refresh_from_db(using=DB)
    return charge


def refund_at_gateway(*, charge: Charge, operation: str = "refund") -> None:
    """Refund a captured charge at the gateway and keep the refund's reference. Run with no
    transaction open. Idempotent: the gateway refunds a charge once, by its reference."""
    reference = gateway.refund(reference=charge.gateway_reference, amount=charge.amount)
    faults.crash_if(FaultRule.CrashPoint.AFTER_CALL, DB, operation)
    Charge.objects.using(DB).filter(id=charge.id, refund_reference__isnull=True).update(refund_reference=reference)


def charge_refund_at_gateway(*, saga_id: uuid.UUID) -> None:
    """The gateway refund of a charge refunded with no outside step before it (a choreographed
    reaction that gave up): sent through the outbox with the local refund, run after its commit."""
    charge = Charge.objects.using(DB).filter(saga_id=saga_id).first()
    if charge is not None and charge.state == Charge.State.REFUNDED and charge.refund_reference is None:
        refund_at_gateway(charge=charge)


def charge_capture(*, saga_id: uuid.UUID) -> Charge:
    """Take the money held by an authorisation (TCC's confirm). Idempotent."""
    with transaction.atomic(using=DB):
        charge = Charge.objects.using(DB).select_for_update().filter(saga_id=saga_id).first()
        if charge is None or charge.state not in (Charge.State.AUTHORIZED, Charge.State.CAPTURED):
            raise PaymentNotCapturable("Nothing authorised to capture", details={"state": charge and charge.state})
        if charge.state == Charge.State.AUTHORIZED:
            charge.state = Charge.State.CAPTURED
            charge.save(using=DB, update_fields=["state", "updated_at"])
            LedgerEntry.objects.using(DB).create(charge=charge, kind=LedgerEntry.Kind.CHARGE, amount=charge.amount)
    return charge


def charge_void(*, saga_id: uuid.UUID) -> Charge | None:
    """Release an authorisation (TCC's cancel). Idempotent; a captured charge is refunded."""
    with transaction.atomic(using=DB):
        charge = Charge.objects.using(DB).select_for_update().filter(saga_id=saga_id).first()
        if charge is None:
            return None
        if charge.state == Charge.State.PENDING:
            raise GatewayUnavailable("The gateway has not answered for this authorisation yet")
        if charge.state == Charge.State.AUTHORIZED:
            charge.state = Charge.State.VOIDED
            charge.save(using=DB, update_fields=["state", "updated_at"])
            return charge
    return charge_refund(saga_id=saga_id)


def charge_refund(*, saga_id: uuid.UUID) -> Charge | None:
    """Record the refund of a saga's charge, in full (the compensation of charge). Idempotent.
    The gateway must have confirmed it first (`charge_undo_call`)."""
    with transaction.atomic(using=DB):
        charge = Charge.objects.using(DB).filter(saga_id=saga_id).first()
        if charge is None:
            return None
        if charge.state == Charge.State.PENDING:
            raise GatewayUnavailable("The gateway has not answered for this charge yet")
        if charge.state == Charge.State.CAPTURED and charge.refund_reference is None:
            # Only an undo with no outside step gets here: a choreographed reaction that gives up
            # undoes its step inside its own transaction. The gateway is not called in it: the
            # outbox sends its refund with this transaction's commit (never lost, run after it).
            outbox.enqueue(using=DB, task=REFUND_AT_GATEWAY_TASK, queue="payments", payload={"saga_id": str(saga_id)})
        if (
            not Charge.objects.using(DB)
            .filter(id=charge.id, state=Charge.State.CAPTURED)
            .update(state=Charge.State.REFUNDED)
        ):
            charge.refresh_from_db(using=DB, fields=["state"])  # a concurrent refund won
            return charge
        LedgerEntry.objects.using(DB).create(charge=charge, kind=LedgerEntry.Kind.REFUND, amount=-charge.amount)
        charge.state = Charge.State.REFUNDED
    return charge
