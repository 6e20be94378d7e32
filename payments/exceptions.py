from sagaplatform.kernel.errors import BusinessError, TransientError


class CardDeclined(BusinessError):
    code = "card_declined"


class PaymentNotCapturable(BusinessError):
    code = "payment_not_capturable"


class GatewayUnavailable(TransientError):
    code = "gateway_unavailable"


class ChargeCancelled(BusinessError):
    code = "charge_cancelled"


class PaymentMethodPending(TransientError):
    """The charge arrived before its payment method's registration: retried."""

    code = "payment_method_pending"


class PaymentMethodUnknown(BusinessError):
    """The payment method was never registered: the charge fails for good."""

    code = "payment_method_unknown"
