"""The inventory service's part in the choreographed order flow."""

from sagaplatform.kernel import events
from sagaplatform.kernel.choreography import reaction
from sagaplatform.kernel.commands import ACTION, COMPENSATE

reaction(
    service="inventory",
    on=(events.ORDER_PLACED,),
    step="reserve_stock",
    op=ACTION,
    operation="reserve",
    emits=events.STOCK_RESERVED,
    emits_on_failure=events.STOCK_REJECTED,
    inputs=("order_id", "items"),
)
reaction(
    service="inventory",
    on=(events.PAYMENT_FAILED, events.PAYMENT_REFUNDED),
    step="reserve_stock",
    op=COMPENSATE,
    operation="release",
    emits=events.STOCK_RELEASED,
    max_attempts=10,
    inputs=("order_id", "items"),
)
reaction(
    service="inventory",
    on=(events.SHIPMENT_DISPATCHED,),
    step="commit_stock",
    op=ACTION,
    operation="commit",
    emits=events.STOCK_COMMITTED,
    max_attempts=30,
)
