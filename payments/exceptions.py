from sagaplatform.kernel.errors import BusinessError, TransientError


class CardDeclined(BusinessError):
    code = "card_declined"


class GatewayUnavailable(TransientError):
    code = "gateway_unavailable"
