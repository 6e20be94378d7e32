from .models import Shipment

DB = "shipping"


def shipment_for_saga(*, saga_id) -> Shipment | None:
    return Shipment.objects.using(DB).filter(saga_id=saga_id).first()


def audit_live_shipments() -> dict[str, str]:
    """Saga id -> state, for shipments still booked or on their way (not cancelled)."""
    live = (Shipment.State.TENTATIVE, Shipment.State.SCHEDULED, Shipment.State.DISPATCHED)
    return {
        str(saga_id): state
        for saga_id, state in Shipment.objects.using(DB).filter(state__in=live).values_list("saga_id", "state")
    }
