"""The choreography's events, declared once: the contract between the services.

Each service's `choreography.py` subscribes to these names and emits them through the constants
below, never through a string of its own; `choreography.reaction` and `choreography.event_message`
refuse an undeclared name. An event is published by a reaction (its `emits` or
`emits_on_failure`), or outside any reaction by the module named in `published_by` (the start of
the flow, the tracker's cancellation). Every published event has a subscriber, unless it is
`final`: the end of a chain, which only the tracker records. `problems()` checks all of that
(`tests/unit/kernel/test_events_registry.py`).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .choreography import Reaction


@dataclass(frozen=True)
class Event:
    name: str
    meaning: str
    # The module that publishes it outside any reaction (the start of a flow, a cancellation).
    published_by: str = ""
    # No service reacts to it: the end of a chain, only the tracker records it.
    final: bool = False


EVENTS: dict[str, Event] = {}

# The version of the event message's schema (its envelope and the context it carries), sent in
# every event as `schema`. A change to what an event carries gets a new number; each reaction
# declares the numbers it accepts (`Reaction.accepts`), and an event that no reaction of the
# receiving service accepts (or that carries no number) is parked as a dead letter, with an
# alert, never run on a guess nor dropped.
SCHEMA = 1


def declare(name: str, meaning: str, *, published_by: str = "", final: bool = False) -> str:
    """Declare an event; returns its name (the constant the services use)."""
    if name in EVENTS:
        raise RuntimeError(f"event {name!r} declared twice")
    EVENTS[name] = Event(name, meaning, published_by=published_by, final=final)
    return name


def get(name: str) -> Event:
    try:
        return EVENTS[name]
    except KeyError:
        raise LookupError(
            f"undeclared choreography event {name!r} (declare it in sagaplatform/kernel/events.py)"
        ) from None


def problems(reactions: Iterable[Reaction], events: dict[str, Event] | None = None) -> list[str]:
    """What is wrong with `reactions` against the declared `events`: a name not declared, an
    event subscribed to that no one publishes, one published that no one handles (and is not
    final), a declared event that nothing uses. Empty when the flow is whole."""
    events = EVENTS if events is None else events
    reactions = list(reactions)
    subscribed = {name: [r for r in reactions if name in r.on] for r in reactions for name in r.on}
    emitted = {name for r in reactions for name in (r.emits, r.emits_on_failure) if name}
    published = emitted | {e.name for e in events.values() if e.published_by}
    found = []
    for name in sorted(set(subscribed) | emitted):
        if name not in events:
            found.append(f"{name}: not declared")
    for name, subscribers in sorted(subscribed.items()):
        if name not in published:
            who = ", ".join(f"{r.service}:{r.key}" for r in subscribers)
            found.append(f"{name}: subscribed to ({who}) but no one publishes it")
    for name in sorted(published):
        event = events.get(name)
        if name not in subscribed and not (event and event.final):
            found.append(f"{name}: published but no one handles it (a subscriber, or declare it final)")
        if name in subscribed and event and event.final:
            found.append(f"{name}: declared final but a service reacts to it")
    for name in sorted(set(events) - set(subscribed) - emitted):
        if not events[name].published_by:
            found.append(f"{name}: declared but neither published nor subscribed to")
    return found


# --- The order flow ----------------------------------------------------------------------------

ORDER_PLACED = declare("order.placed", "A choreographed order was placed.", published_by="orders.services")
STOCK_RESERVED = declare("stock.reserved", "Inventory reserved the order's stock.")
STOCK_REJECTED = declare("stock.rejected", "Inventory could not reserve the stock.")
PAYMENT_CAPTURED = declare("payment.captured", "Payments charged the card.")
PAYMENT_FAILED = declare("payment.failed", "Payments could not charge the card.")
ORDER_APPROVED = declare("order.approved", "Orders approved the order.")
ORDER_APPROVAL_FAILED = declare("order.approval_failed", "Orders could not approve the order.")
SHIPMENT_SCHEDULED = declare("shipment.scheduled", "Shipping booked the shipment (the handling window starts).")
SHIPMENT_FAILED = declare("shipment.failed", "Shipping could not book the shipment.")
SHIPMENT_DISPATCHED = declare("shipment.dispatched", "The parcel left the warehouse (the point of no return).")
SHIPMENT_DISPATCH_FAILED = declare("shipment.dispatch_failed", "Shipping gave up on the dispatch.")
ORDER_CANCEL_REQUESTED = declare(
    "order.cancel_requested",
    "Someone cancelled the order (the tracker announces it: the definition's `cancel_event`).",
    published_by="orchestration.definitions",
)
SHIPMENT_HELD = declare("shipment.held", "Shipping held the dispatch for a cancellation.")
CANCELLATION_REFUSED = declare(
    "cancellation.refused", "Shipping refused a cancellation: the parcel had left.", final=True
)
SHIPMENT_CANCELLED = declare("shipment.cancelled", "Shipping cancelled the booking.")
ORDER_REVOKED = declare("order.revoked", "Orders revoked the approval.")
PAYMENT_REFUNDED = declare("payment.refunded", "Payments refunded the charge.")
STOCK_RELEASED = declare("stock.released", "Inventory released the stock.")
ORDER_REJECTED = declare("order.rejected", "Orders rejected the order (the unwinding is over).")
STOCK_COMMITTED = declare("stock.committed", "Inventory committed the shipped stock.", final=True)
ORDER_SHIPPED = declare("order.shipped", "Orders marked the order shipped.", final=True)
CUSTOMER_NOTIFIED = declare("customer.notified", "The customer was told the order shipped.", final=True)
CUSTOMER_TOLD = declare("customer.told", "The customer was told why the order failed.", final=True)
