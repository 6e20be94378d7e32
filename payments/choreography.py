"""The payment service's part in the choreographed order flow."""

from sagaplatform.kernel.choreography import reaction
from sagaplatform.kernel.commands import ACTION, COMPENSATE

reaction(
    service="payments",
    on=("stock.reserved",),
    step="charge_payment",
    op=ACTION,
    operation="charge",
    emits="payment.captured",
    emits_on_failure="payment.failed",
)
reaction(
    service="payments",
    on=("order.revoked", "order.approval_failed"),
    step="charge_payment",
    op=COMPENSATE,
    operation="refund",
    emits="payment.refunded",
    max_attempts=10,
)
