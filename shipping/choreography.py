"""The shipping service's part in the choreographed order flow.

A cancellation goes through shipping first: it holds the dispatch (a no-op that the barrier
turns into a block on the dispatch, unless the parcel already left, which refuses the
cancellation), then cancels the booking, which starts the chain of compensations.
"""

from sagaplatform.kernel import events
from sagaplatform.kernel.choreography import reaction
from sagaplatform.kernel.commands import ACTION, COMPENSATE

reaction(
    service="shipping",
    on=(events.ORDER_APPROVED,),
    step="schedule_shipment",
    op=ACTION,
    operation="schedule",
    emits=events.SHIPMENT_SCHEDULED,
    emits_on_failure=events.SHIPMENT_FAILED,
    inputs=("order_id", "shipping_address"),
)
reaction(
    service="shipping",
    on=(events.SHIPMENT_SCHEDULED,),
    step="dispatch_shipment",
    op=ACTION,
    operation="dispatch",
    emits=events.SHIPMENT_DISPATCHED,
    emits_on_failure=events.SHIPMENT_DISPATCH_FAILED,
    max_attempts=10,
    start_after="SHIPPING_HANDLING_SECONDS",
)
reaction(
    service="shipping",
    on=(events.ORDER_CANCEL_REQUESTED,),
    step="dispatch_shipment",
    op=COMPENSATE,
    operation="hold_dispatch",
    emits=events.SHIPMENT_HELD,
    emits_on_failure=events.CANCELLATION_REFUSED,
)
reaction(
    service="shipping",
    on=(events.SHIPMENT_HELD, events.SHIPMENT_DISPATCH_FAILED),
    step="schedule_shipment",
    op=COMPENSATE,
    operation="cancel",
    emits=events.SHIPMENT_CANCELLED,
    max_attempts=10,
    inputs=("order_id", "shipping_address"),
)
