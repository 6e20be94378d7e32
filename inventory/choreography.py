"""The inventory service's part in the choreographed order flow."""

from sagaplatform.kernel.choreography import reaction
from sagaplatform.kernel.commands import ACTION, COMPENSATE

reaction(
    service="inventory",
    on=("order.placed",),
    step="reserve_stock",
    op=ACTION,
    operation="reserve",
    emits="stock.reserved",
    emits_on_failure="stock.rejected",
)
reaction(
    service="inventory",
    on=("payment.failed", "payment.refunded"),
    step="reserve_stock",
    op=COMPENSATE,
    operation="release",
    emits="stock.released",
    max_attempts=10,
)
reaction(
    service="inventory",
    on=("shipment.dispatched",),
    step="commit_stock",
    op=ACTION,
    operation="commit",
    emits="stock.committed",
    max_attempts=30,
)
