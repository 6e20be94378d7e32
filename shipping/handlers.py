"""The shipping service's operations, each beside its compensation."""

from sagaplatform.kernel.commands import Command, operation

from . import services


def _book(command: Command, *, tentative: bool) -> dict:
    shipment = services.shipment_schedule(
        saga_id=command.saga_id,
        order_id=command.payload["order_id"],
        address=command.payload["shipping_address"],
        tentative=tentative,
    )
    return {"shipment_id": str(shipment.id), "tracking_number": shipment.tracking_number}


@operation("shipping", "schedule")
def schedule(*, command: Command) -> dict:
    return _book(command, tentative=False)


# TCC: tentative booking (try), confirm (confirm), cancel (cancel, shared with the saga).


@operation("shipping", "book_tentative")
def book_tentative(*, command: Command) -> dict:
    return _book(command, tentative=True)


@operation("shipping", "confirm_booking")
def confirm_booking(*, command: Command) -> dict:
    return {"state": services.shipment_confirm(saga_id=command.saga_id).state}


@operation("shipping", "dispatch")
def dispatch(*, command: Command) -> dict:
    shipment = services.shipment_dispatch(saga_id=command.saga_id)
    return {"tracking_number": shipment.tracking_number, "state": shipment.state}


@operation("shipping", "cancel")
def cancel(*, command: Command) -> dict:
    return {"cancelled": services.shipment_cancel(saga_id=command.saga_id)}


@operation("shipping", "hold_dispatch")
def hold_dispatch(*, command: Command) -> dict:
    """Stop the parcel leaving (choreography's cancellation). Reached only if the dispatch ran
    first (otherwise the barrier makes it a no-op that blocks the dispatch): too late."""
    services.shipment_refuse_hold(saga_id=command.saga_id)
    return {}
