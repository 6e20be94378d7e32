"""The payment service's operations, each beside its compensation.

Those that call the gateway do it in their `outside` step, with no transaction open (see
`services`); the operation itself, run through the barrier, records or reads the answer."""

from decimal import Decimal

from django.db import transaction

from sagaplatform.kernel import barrier
from sagaplatform.kernel.commands import Command, operation

from . import services
from .models import Charge

DB = services.DB


def _take_outside(*, command: Command) -> None:
    token = services.payment_method_token(reference=command.payload["payment_method"])
    if not token:
        return  # not registered (yet): no intent and no call; the operation says what that means
    with transaction.atomic(using=DB):
        # The barrier row and the pending charge commit together: a compensation arriving from
        # now on finds an action to undo, and one that came first has refused this one.
        if barrier.begin(using=DB, command=command) is not None:
            return  # already answered, or refused: no call
        payload = command.payload
        services.charge_begin(
            saga_id=command.saga_id,
            order_id=payload["order_id"],
            amount=Decimal(payload["amount"]),
            currency=payload.get("currency", "EUR"),
            token=token,
            capture=command.operation == "charge",
        )
    services.charge_call(saga_id=command.saga_id, attempt=command.attempt, operation=command.operation)


def _registered(*, command: Command) -> bool:
    """Whether the charge's card is registered (its registration travels in a message of its own)."""
    return services.payment_method_registered(reference=command.payload.get("payment_method"))


def _undo_outside(*, command: Command) -> None:
    services.charge_undo_call(
        saga_id=command.saga_id, step=command.step, attempt=command.attempt, operation=command.operation
    )


def _take(command: Command) -> dict:
    charge = Charge.objects.using(DB).filter(saga_id=command.saga_id).first()
    if charge is None:
        # No intent: the payment method was not registered when the outside step looked.
        services.payment_method_missing(reference=command.payload["payment_method"], attempt=command.attempt)
    return services.charge_result(services.charge_outcome(saga_id=command.saga_id, charge=charge))


@operation("payments", "charge", outside=_take_outside, ready=_registered)
def charge(*, command: Command) -> dict:
    return _take(command)


# TCC: authorise (try), capture (confirm), void (cancel).


@operation("payments", "authorize", outside=_take_outside, ready=_registered)
def authorize(*, command: Command) -> dict:
    return _take(command)


@operation("payments", "capture")
def capture(*, command: Command) -> dict:
    return {"captured": str(services.charge_capture(saga_id=command.saga_id).amount)}


@operation("payments", "void", outside=_undo_outside)
def void(*, command: Command) -> dict:
    result = services.charge_void(saga_id=command.saga_id)
    return {"state": result.state if result else None}


@operation("payments", "refund", outside=_undo_outside)
def refund(*, command: Command) -> dict:
    result = services.charge_refund(saga_id=command.saga_id)
    return {"refunded": str(result.amount) if result else "0.00"}
