"""What a service operation may raise, and what happens next.

* `BusinessError`: the request can never succeed (card declined, out of stock). The step fails
  for good and the saga compensates; nothing is retried. Partial effects are rolled back.
* `TransientError`: it may succeed later (gateway timeout, lock contention). The orchestrator
  retries the step with backoff. Any other exception counts as transient too.
"""

from __future__ import annotations

from typing import Any


class StepError(Exception):
    code = "step_error"

    def __init__(self, message: str, *, code: str | None = None, details: dict[str, Any] | None = None) -> None:
        super().__init__(message)
        self.message = message
        if code:
            self.code = code
        self.details = details or {}

    def as_dict(self) -> dict[str, Any]:
        return {"code": self.code, "message": self.message, "details": self.details}


class BusinessError(StepError):
    code = "business_failure"


class TransientError(StepError):
    code = "transient_error"
