"""What the customer's order page shows live: the order and its saga's action steps.

Shared by the page (its first render) and its websocket (every change after), so both say the
same thing. The saga's part comes through the kernel port or the live feed's delta, never from
the orchestrator's models.
"""

from __future__ import annotations

from .models import Order

OPEN = (Order.Status.PENDING, Order.Status.APPROVED)


def can_cancel(order: Order, saga: dict | None) -> bool:
    """A cancel the engine would accept now. Before the saga has started (its start message is
    on its way) a cancel is accepted: the saga is then started already cancelled."""
    return order.status in OPEN and (saga is None or bool(saga.get("cancellable")))


ENDED = (Order.Status.REJECTED, Order.Status.CANCELLED)

# Why an order did not go through, in the customer's words, by failure code. The engine's own
# message ("charge_payment failed after 5 attempt(s): ...") stays in the operator API and the
# dashboard.
FAILURE_TEXTS = {
    "card_declined": "Your card was declined, so nothing was charged.",
    "payment_method_unknown": "We could not use your card, so nothing was charged. Please order again.",
    "insufficient_stock": "We do not have enough stock for one of the items you ordered.",
    "unknown_sku": "One of the items you ordered is no longer sold.",
    "deadline_exceeded": "Your order took too long to complete, so we stopped it.",
    "cancelled": "You cancelled this order.",
}
# Out of retries: which service did not answer, from the step named in the engine's message.
UNREACHABLE = {
    "reserve_stock": "We could not reserve your items: our stock service did not answer in time.",
    "charge_payment": "We could not take your payment: the payment service did not answer in time.",
    "schedule_shipment": "We could not book the delivery: the delivery service did not answer in time.",
}
FAILURE_DEFAULT = "Something went wrong on our side while completing your order."


def failure_text(code: str, message: str) -> str:
    if code in FAILURE_TEXTS:
        return FAILURE_TEXTS[code]
    step = message.split(" ", 1)[0]
    if code == "retries_exhausted" and step in UNREACHABLE:
        return UNREACHABLE[step]
    return FAILURE_DEFAULT


def shown_state(step: dict, status: str) -> str:
    """The state the customer is shown: a step the order never reached is "not needed", and a
    step undone without ever having taken effect (a payment that never went through) is "not
    done", not "undone"."""
    if status in ENDED and step["state"] == "pending":
        return "not_started"
    if step["state"] == "compensated" and not step.get("acted", True):
        return "not_done"
    return step["state"]


def order_state(order: Order, saga: dict | None) -> dict:
    """The `order` message of docs/LIVE_FEED.md. `saga` is a summary (port) or a feed delta's
    header merged with its steps: both carry `state`, `cancellable` and `steps`."""
    return {
        "type": "order",
        "order": {
            "id": str(order.id),
            "status": order.status,
            "can_cancel": can_cancel(order, saga),
            "failure": {"code": order.failure_code, "message": failure_text(order.failure_code, order.failure_message)}
            if order.failure_code
            else None,
        },
        "saga": None
        if saga is None
        else {
            "state": saga["state"],
            "version": saga.get("version"),
            "steps": [
                {
                    "name": s["name"],
                    "state": s["state"],
                    "shown": shown_state(s, order.status),
                    "attempts": s["attempts"],
                }
                for s in saga["steps"]
                if s["kind"] == "action"
            ],
        },
    }
