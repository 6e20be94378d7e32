from .models import Shipment

DB = "shipping"


def shipment_for_saga(*, saga_id) -> Shipment | None:
    return Shipment.objects.using(DB).filter(saga_id=saga_id).first()


def audit_live_shipments() -> set[str]:
    """Saga ids with a shipment still booked (not cancelled)."""
    return {
        str(s)
        for s in Shipment.objects.using(DB).filter(state=Shipment.State.SCHEDULED).values_list("saga_id", flat=True)
    }
