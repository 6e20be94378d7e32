"""The shipping service's part in the choreographed order flow.

A cancellation goes through shipping first: it holds the dispatch (a no-op that the barrier
turns into a block on the dispatch, unless the parcel already left, which refuses the
cancellation), then cancels the booking, which starts the chain of compensations.
"""

from sagaplatform.kernel.choreography import reaction
from sagaplatform.kernel.commands import ACTION, COMPENSATE

reaction(
    service="shipping",
    on=("order.approved",),
    step="schedule_shipment",
    op=ACTION,
    operation="schedule",
    emits="shipment.scheduled",
    emits_on_failure="shipment.failed",
)
reaction(
    service="shipping",
    on=("shipment.scheduled",),
    step="dispatch_shipment",
    op=ACTION,
    operation="dispatch",
    emits="shipment.dispatched",
    emits_on_failure="shipment.dispatch_failed",
    max_attempts=10,
    start_after="SHIPPING_HANDLING_SECONDS",
)
reaction(
    service="shipping",
    on=("order.cancel_requested",),
    step="dispatch_shipment",
    op=COMPENSATE,
    operation="hold_dispatch",
    emits="shipment.held",
    emits_on_failure="cancellation.refused",
)
reaction(
    service="shipping",
    on=("shipment.held", "shipment.dispatch_failed"),
    step="schedule_shipment",
    op=COMPENSATE,
    operation="cancel",
    emits="shipment.cancelled",
    max_attempts=10,
)
