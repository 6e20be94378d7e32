"""Charge and refund. Each runs inside the caller's transaction on the `payments` alias."""

from __future__ import annotations

import uuid
from decimal import Decimal

from django.db import transaction

from . import gateway
from .models import Charge, LedgerEntry

DB = "payments"


def charge_create(
    *, saga_id: uuid.UUID, order_id: uuid.UUID, amount: Decimal, currency: str, token: str, attempt: int = 1
) -> Charge:
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
        )
        LedgerEntry.objects.using(DB).create(charge=charge, kind=LedgerEntry.Kind.CHARGE, amount=charge.amount)
    return charge


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
