"""The notification service's part in the choreographed order flow."""

from sagaplatform.kernel.choreography import reaction
from sagaplatform.kernel.commands import ACTION

reaction(
    service="notifications",
    on=("shipment.dispatched",),
    step="notify_customer",
    op=ACTION,
    operation="send_confirmation",
    emits="customer.notified",
    max_attempts=10,
)
reaction(
    service="notifications",
    on=("order.rejected",),
    step="notify_failure",
    op=ACTION,
    operation="send_failure",
    emits="customer.told",
    max_attempts=20,
)
