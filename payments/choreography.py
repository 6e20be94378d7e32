"""The payment service's part in the choreographed order flow."""

from sagaplatform.kernel import breakers, events
from sagaplatform.kernel.choreography import reaction, settles
from sagaplatform.kernel.commands import ACTION, COMPENSATE

from . import services

reaction(
    service="payments",
    on=(events.STOCK_RESERVED,),
    step="charge_payment",
    op=ACTION,
    operation="charge",
    emits=events.PAYMENT_CAPTURED,
    emits_on_failure=events.PAYMENT_FAILED,
    inputs=("order_id", "amount", "currency", "payment_method"),
    breakers=(breakers.GATEWAY,),  # the charge calls the gateway
)
reaction(
    service="payments",
    on=(events.ORDER_REVOKED, events.ORDER_APPROVAL_FAILED),
    step="charge_payment",
    op=COMPENSATE,
    operation="refund",
    emits=events.PAYMENT_REFUNDED,
    max_attempts=10,
    inputs=("order_id", "amount", "currency", "payment_method"),
)

# A charge whose reaction failed after the gateway answered: before the give-up refunds it, the
# charge is reconciled with the gateway and its action's outcome stored.
settles("payments", "charge")(services.charge_settle)
