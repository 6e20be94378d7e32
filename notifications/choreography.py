"""The notification service's part in the choreographed order flow."""

from sagaplatform.kernel import events
from sagaplatform.kernel.choreography import reaction
from sagaplatform.kernel.commands import ACTION

reaction(
    service="notifications",
    on=(events.SHIPMENT_DISPATCHED,),
    step="notify_customer",
    op=ACTION,
    operation="send_confirmation",
    emits=events.CUSTOMER_NOTIFIED,
    max_attempts=10,
    inputs=("order_id", "customer_email", "shipping_address"),
)
reaction(
    service="notifications",
    on=(events.ORDER_REJECTED,),
    step="notify_failure",
    op=ACTION,
    operation="send_failure",
    emits=events.CUSTOMER_TOLD,
    max_attempts=20,
    inputs=("order_id", "customer_email", "shipping_address"),
)
