"""The payment service's operations, each beside its compensation."""

from decimal import Decimal

from sagaplatform.kernel.commands import Command, operation

from . import services


def _take(command: Command, *, capture: bool) -> dict:
    payload = command.payload
    result = services.charge_create(
        saga_id=command.saga_id,
        order_id=payload["order_id"],
        amount=Decimal(payload["amount"]),
        currency=payload.get("currency", "EUR"),
        token=payload["payment_token"],
        attempt=command.attempt,
        capture=capture,
    )
    return {"charge_id": str(result.id), "amount": str(result.amount), "reference": result.gateway_reference}


@operation("payments", "charge")
def charge(*, command: Command) -> dict:
    return _take(command, capture=True)


# TCC: authorise (try), capture (confirm), void (cancel).


@operation("payments", "authorize")
def authorize(*, command: Command) -> dict:
    return _take(command, capture=False)


@operation("payments", "capture")
def capture(*, command: Command) -> dict:
    return {"captured": str(services.charge_capture(saga_id=command.saga_id).amount)}


@operation("payments", "void")
def void(*, command: Command) -> dict:
    result = services.charge_void(saga_id=command.saga_id)
    return {"state": result.state if result else None}


@operation("payments", "refund")
def refund(*, command: Command) -> dict:
    result = services.charge_refund(saga_id=command.saga_id)
    return {"refunded": str(result.amount) if result else "0.00"}
