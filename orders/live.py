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


def order_state(order: Order, saga: dict | None) -> dict:
    """The `order` message of docs/LIVE_FEED.md. `saga` is a summary (port) or a feed delta's
    header merged with its steps: both carry `state`, `cancellable` and `steps`."""
    return {
        "type": "order",
        "order": {
            "id": str(order.id),
            "status": order.status,
            "can_cancel": can_cancel(order, saga),
            "failure": {"code": order.failure_code, "message": order.failure_message} if order.failure_code else None,
        },
        "saga": None
        if saga is None
        else {
            "state": saga["state"],
            "version": saga.get("version"),
            "steps": [
                {"name": s["name"], "state": s["state"], "attempts": s["attempts"]}
                for s in saga["steps"]
                if s["kind"] == "action"
            ],
        },
    }
