"""Shipment writes. Each runs inside the caller's transaction on the `shipping` alias."""

from __future__ import annotations

import uuid

from django.utils import timezone

from sagaplatform.kernel import barrier

from .exceptions import AlreadyDispatched, ShipmentNotDispatchable
from .models import Shipment

DB = "shipping"


def shipment_schedule(*, saga_id: uuid.UUID, order_id: uuid.UUID, address: dict, tentative: bool = False) -> Shipment:
    """Book a parcel with the carrier (with `tentative`, only hold the slot: TCC's try)."""
    with barrier.atomic(DB):
        return Shipment.objects.using(DB).create(
            saga_id=saga_id,
            order_id=order_id,
            address=address,
            # The id's last 16 digits, its random part: the first are its creation time.
            tracking_number="SP" + uuid.UUID(str(saga_id)).hex[-16:].upper(),
            state=Shipment.State.TENTATIVE if tentative else Shipment.State.SCHEDULED,
        )


def shipment_confirm(*, saga_id: uuid.UUID) -> Shipment:
    """Confirm a tentative booking (TCC's confirm). Idempotent."""
    with barrier.atomic(DB):
        shipment = Shipment.objects.using(DB).select_for_update().filter(saga_id=saga_id).first()
        if shipment is None or shipment.state == Shipment.State.CANCELLED:
            raise ShipmentNotDispatchable("Nothing booked to confirm", details={"saga_id": str(saga_id)})
        if shipment.state == Shipment.State.TENTATIVE:
            shipment.state = Shipment.State.SCHEDULED
            shipment.save(using=DB, update_fields=["state", "updated_at"])
    return shipment


def shipment_dispatch(*, saga_id: uuid.UUID) -> Shipment:
    """The parcel leaves the warehouse: from here on it cannot be cancelled. Idempotent."""
    with barrier.atomic(DB):
        shipment = Shipment.objects.using(DB).select_for_update().filter(saga_id=saga_id).first()
        if shipment is None or shipment.state == Shipment.State.CANCELLED:
            raise ShipmentNotDispatchable(
                "The shipment was cancelled or never booked", details={"saga_id": str(saga_id)}
            )
        if shipment.state == Shipment.State.SCHEDULED:
            shipment.state, shipment.dispatched_at = Shipment.State.DISPATCHED, timezone.now()
            shipment.save(using=DB, update_fields=["state", "dispatched_at", "updated_at"])
    return shipment


def shipment_cancel(*, saga_id: uuid.UUID) -> int:
    """Cancel the saga's shipment (the compensation of schedule). Idempotent."""
    return (
        Shipment.objects.using(DB)
        .filter(saga_id=saga_id, state__in=(Shipment.State.TENTATIVE, Shipment.State.SCHEDULED))
        .update(state=Shipment.State.CANCELLED)
    )


def shipment_refuse_hold(*, saga_id: uuid.UUID) -> None:
    shipment = Shipment.objects.using(DB).filter(saga_id=saga_id).first()
    if shipment is not None and shipment.state == Shipment.State.DISPATCHED:
        raise AlreadyDispatched(
            "The parcel has left the warehouse", details={"tracking_number": shipment.tracking_number}
        )
