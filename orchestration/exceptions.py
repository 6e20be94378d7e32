from sagaplatform.api import ApiError


class OperationNotAllowed(ApiError):
    """An operator action the saga's state refuses (409 unless said otherwise)."""

    status = 409

    def __init__(self, code: str, message: str, *, status: int | None = None, details: dict | None = None) -> None:
        super().__init__(message, details=details)
        self.code = code
        if status:
            self.status = status
