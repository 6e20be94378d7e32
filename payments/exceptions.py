from sagaplatform.kernel.errors import BusinessError, TransientError


class CardDeclined(BusinessError):
    code = "card_declined"


class PaymentNotCapturable(BusinessError):
    code = "payment_not_capturable"


class GatewayUnavailable(TransientError):
    code = "gateway_unavailable"


class ChargeCancelled(BusinessError):
    code = "charge_cancelled"
