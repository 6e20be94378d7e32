"""Shipment writes. Each runs inside the caller's transaction on the `shipping` alias."""

from __future__ import annotations

import uuid

from django.db import transaction

from .models import Shipment

DB = "shipping"


def shipment_schedule(*, saga_id: uuid.UUID, order_id: uuid.UUID, address: dict) -> Shipment:
    with transaction.atomic(using=DB):
        return Shipment.objects.using(DB).create(
            saga_id=saga_id,
            order_id=order_id,
            address=address,
            tracking_number="SP" + uuid.UUID(str(saga_id)).hex[:16].upper(),
        )


def shipment_cancel(*, saga_id: uuid.UUID) -> int:
    """Cancel the saga's shipment (the compensation of schedule). Idempotent."""
    return (
        Shipment.objects.using(DB)
        .filter(saga_id=saga_id, state=Shipment.State.SCHEDULED)
        .update(state=Shipment.State.CANCELLED)
    )
