"""The notification service's operations. A message sent cannot be unsent: no compensation."""

from sagaplatform.kernel.commands import Command, operation

from . import services
from .models import Notification


def _queue(command: Command, kind: str, reason: str = "") -> dict:
    payload = command.payload
    sent = services.notification_queue(
        saga_id=command.saga_id,
        order_id=payload["order_id"],
        kind=kind,
        email=payload.get("customer_email", ""),
        phone=(payload.get("shipping_address") or {}).get("phone", ""),
        reason=reason,
    )
    return {"notifications": [str(n.id) for n in sent]}


@operation("notifications", "send_confirmation")
def send_confirmation(*, command: Command) -> dict:
    return _queue(command, Notification.Kind.ORDER_CONFIRMED)


@operation("notifications", "send_failure")
def send_failure(*, command: Command) -> dict:
    failure = command.payload.get("failure") or {}
    kind = Notification.Kind.ORDER_CANCELLED if failure.get("code") == "cancelled" else Notification.Kind.ORDER_FAILED
    return _queue(command, kind, reason=failure.get("message", ""))
