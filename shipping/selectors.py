from .models import Shipment

DB = "shipping"


def shipment_for_saga(*, saga_id) -> Shipment | None:
    return Shipment.objects.using(DB).filter(saga_id=saga_id).first()
