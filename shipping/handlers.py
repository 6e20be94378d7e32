"""The shipping service's operations, each beside its compensation."""

from sagaplatform.kernel.commands import Command, operation

from . import services


@operation("shipping", "schedule")
def schedule(*, command: Command) -> dict:
    shipment = services.shipment_schedule(
        saga_id=command.saga_id,
        order_id=command.payload["order_id"],
        address=command.payload["shipping_address"],
    )
    return {"shipment_id": str(shipment.id), "tracking_number": shipment.tracking_number}


@operation("shipping", "dispatch")
def dispatch(*, command: Command) -> dict:
    shipment = services.shipment_dispatch(saga_id=command.saga_id)
    return {"tracking_number": shipment.tracking_number, "state": shipment.state}


@operation("shipping", "cancel")
def cancel(*, command: Command) -> dict:
    return {"cancelled": services.shipment_cancel(saga_id=command.saga_id)}
