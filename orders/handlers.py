"""The order service's operations, each beside its compensation."""

from sagaplatform.kernel.commands import Command, operation

from . import services


@operation("orders", "approve")
def approve(*, command: Command) -> dict:
    return {"status": services.order_approve(order_id=command.payload["order_id"]).status}


@operation("orders", "revoke")
def revoke(*, command: Command) -> dict:
    return {"status": services.order_revoke(order_id=command.payload["order_id"]).status}


@operation("orders", "ship")
def ship(*, command: Command) -> dict:
    return {"status": services.order_ship(order_id=command.payload["order_id"]).status}


@operation("orders", "reject")
def reject(*, command: Command) -> dict:
    failure = command.payload.get("failure") or {}
    order = services.order_reject(
        order_id=command.payload["order_id"],
        code=failure.get("code", "saga_failed"),
        message=failure.get("message", "The order could not be completed"),
    )
    return {"status": order.status}


# TCC: the order is checked (try), approved (confirm), and left pending on cancel, for the
# saga's failure steps to reject.


@operation("orders", "check_pending")
def check_pending(*, command: Command) -> dict:
    return {"status": services.order_check_pending(order_id=command.payload["order_id"]).status}


@operation("orders", "release_check")
def release_check(*, command: Command) -> dict:
    return {}
