from sagaplatform.kernel.errors import BusinessError, TransientError


class InsufficientStock(BusinessError):
    code = "insufficient_stock"


class UnknownSku(BusinessError):
    code = "unknown_sku"


class StockContention(TransientError):
    code = "stock_contention"
