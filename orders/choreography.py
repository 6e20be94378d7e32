"""The order service's part in the choreographed order flow."""

from sagaplatform.kernel.choreography import reaction
from sagaplatform.kernel.commands import ACTION, COMPENSATE

reaction(
    service="orders",
    on=("payment.captured",),
    step="approve_order",
    op=ACTION,
    operation="approve",
    emits="order.approved",
    emits_on_failure="order.approval_failed",
)
reaction(
    service="orders",
    on=("shipment.failed", "shipment.cancelled"),
    step="approve_order",
    op=COMPENSATE,
    operation="revoke",
    emits="order.revoked",
    max_attempts=10,
)
reaction(
    service="orders",
    on=("shipment.dispatched",),
    step="mark_shipped",
    op=ACTION,
    operation="ship",
    emits="order.shipped",
    max_attempts=30,
)
# The end of every unhappy path: the stock is back, so the order is closed with the reason.
reaction(
    service="orders",
    on=("stock.released", "stock.rejected"),
    step="reject_order",
    op=ACTION,
    operation="reject",
    emits="order.rejected",
    max_attempts=20,
)
