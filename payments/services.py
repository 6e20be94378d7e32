"""Charge and refund. Each runs inside the caller's transaction on the `payments` alias."""

from __future__ import annotations

import uuid
from decimal import Decimal

from django.db import transaction

from . import gateway
from .exceptions import PaymentNotCapturable
from .models import Charge, LedgerEntry

DB = "payments"


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
    """Take the money (or, with `capture=False`, only hold it: TCC's try)."""
    # The gateway call carries an idempotency key of its own, so a retry after a crash between
    # the gateway's answer and our commit cannot take the money twice.
    result = gateway.charge(token=token, amount=amount, idempotency_key=f"{saga_id}:charge", attempt=attempt)
    with transaction.atomic(using=DB):
        charge = Charge.objects.using(DB).create(
            saga_id=saga_id,
            order_id=order_id,
            amount=result.amount,
            currency=currency,
            gateway_reference=result.reference,
            state=Charge.State.CAPTURED if capture else Charge.State.AUTHORIZED,
        )
        if capture:
            LedgerEntry.objects.using(DB).create(charge=charge, kind=LedgerEntry.Kind.CHARGE, amount=charge.amount)
    return charge


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
        if charge.state == Charge.State.AUTHORIZED:
            charge.state = Charge.State.VOIDED
            charge.save(using=DB, update_fields=["state", "updated_at"])
            return charge
    return charge_refund(saga_id=saga_id)


def charge_refund(*, saga_id: uuid.UUID) -> Charge | None:
    """Refund a saga's charge in full (the compensation of charge). Idempotent."""
    with transaction.atomic(using=DB):
        charge = Charge.objects.using(DB).filter(saga_id=saga_id).first()
        if charge is None:
            return None
        if (
            not Charge.objects.using(DB)
            .filter(id=charge.id, state=Charge.State.CAPTURED)
            .update(state=Charge.State.REFUNDED)
        ):
            charge.refresh_from_db(using=DB, fields=["state"])  # a concurrent refund won
            return charge
        gateway.refund(reference=charge.gateway_reference, amount=charge.amount)
        LedgerEntry.objects.using(DB).create(charge=charge, kind=LedgerEntry.Kind.REFUND, amount=-charge.amount)
        charge.state = Charge.State.REFUNDED
    return charge
