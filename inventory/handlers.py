"""The inventory service's operations, each beside its compensation."""

from sagaplatform.kernel.commands import Command, operation

from . import services


@operation("inventory", "reserve")
def reserve(*, command: Command) -> dict:
    lines = services.reservation_reserve(
        saga_id=command.saga_id,
        order_id=command.payload["order_id"],
        lines=command.payload["items"],
    )
    return {"reserved": [{"sku": line.sku, "quantity": line.quantity, "version": line.version} for line in lines]}


@operation("inventory", "release")
def release(*, command: Command) -> dict:
    return {"released": services.reservation_release(saga_id=command.saga_id)}


@operation("inventory", "commit")
def commit(*, command: Command) -> dict:
    return {"committed": services.reservation_commit(saga_id=command.saga_id)}
