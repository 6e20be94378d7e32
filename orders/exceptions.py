from sagaplatform.api import ApiError, ServiceUnavailable
from sagaplatform.kernel.errors import BusinessError


class OrderError(ApiError):
    """A request the orders service refuses; `status` is the HTTP status it maps to."""

    status = 400
    code = "invalid_order"


class UnknownProduct(OrderError):
    code = "unknown_sku"


class OrderTooLarge(OrderError):
    code = "order_total_too_large"


class IdempotencyKeyReused(OrderError):
    status = 422
    code = "idempotency_key_reused"


class IdempotencyKeyInFlight(OrderError):
    status = 409
    code = "idempotency_key_in_flight"


class Overloaded(ServiceUnavailable):
    code = "overloaded"


class OrderNotInState(BusinessError):
    code = "order_not_in_state"
