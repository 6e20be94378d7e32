"""The payment service's operations, each beside its compensation."""

from decimal import Decimal

from sagaplatform.kernel.commands import Command, operation

from . import services


@operation("payments", "charge")
def charge(*, command: Command) -> dict:
    payload = command.payload
    result = services.charge_create(
        saga_id=command.saga_id,
        order_id=payload["order_id"],
        amount=Decimal(payload["amount"]),
        currency=payload.get("currency", "EUR"),
        token=payload["payment_token"],
        attempt=command.attempt,
    )
    return {"charge_id": str(result.id), "amount": str(result.amount), "reference": result.gateway_reference}


@operation("payments", "refund")
def refund(*, command: Command) -> dict:
    result = services.charge_refund(saga_id=command.saga_id)
    return {"refunded": str(result.amount) if result else "0.00"}
