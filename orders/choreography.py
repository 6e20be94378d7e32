"""The order service's part in the choreographed order flow."""

from sagaplatform.kernel import events
from sagaplatform.kernel.choreography import reaction
from sagaplatform.kernel.commands import ACTION, COMPENSATE

reaction(
    service="orders",
    on=(events.PAYMENT_CAPTURED,),
    step="approve_order",
    op=ACTION,
    operation="approve",
    emits=events.ORDER_APPROVED,
    emits_on_failure=events.ORDER_APPROVAL_FAILED,
)
reaction(
    service="orders",
    on=(events.SHIPMENT_FAILED, events.SHIPMENT_CANCELLED),
    step="approve_order",
    op=COMPENSATE,
    operation="revoke",
    emits=events.ORDER_REVOKED,
    max_attempts=10,
)
reaction(
    service="orders",
    on=(events.SHIPMENT_DISPATCHED,),
    step="mark_shipped",
    op=ACTION,
    operation="ship",
    emits=events.ORDER_SHIPPED,
    max_attempts=30,
)
# The end of every unhappy path: the stock is back, so the order is closed with the reason.
reaction(
    service="orders",
    on=(events.STOCK_RELEASED, events.STOCK_REJECTED),
    step="reject_order",
    op=ACTION,
    operation="reject",
    emits=events.ORDER_REJECTED,
    max_attempts=20,
)
