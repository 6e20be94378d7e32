"""A simulated card gateway whose test tokens behave like a card network's test cards.

| token                  | behaviour                                                    |
|------------------------|--------------------------------------------------------------|
| `tok_visa`             | always succeeds                                              |
| `tok_declined`         | declined: a business failure, never retried                  |
| `tok_flaky` / `tok_flaky_N` | fails transiently on the first N attempts (default 2), then succeeds |
| `tok_hang`             | blocks for `PAYMENT_GATEWAY_HANG_SECONDS`, past any step timeout, then succeeds |

Any other token is treated as `tok_visa`, like a sandbox accepting any well-formed card. The
gateway is keyed by an idempotency key: the same key always yields the same reference.
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass
from decimal import Decimal

from django.conf import settings

from .exceptions import CardDeclined, GatewayUnavailable

TOKEN_OK = "tok_visa"
TOKEN_DECLINED = "tok_declined"
TOKEN_FLAKY = "tok_flaky"
TOKEN_HANG = "tok_hang"
DEFAULT_FLAKY_FAILURES = 2


@dataclass(frozen=True)
class GatewayCharge:
    reference: str
    amount: Decimal


def _flaky_failures(token: str) -> int:
    suffix = token.removeprefix(TOKEN_FLAKY).lstrip("_")
    return int(suffix) if suffix.isdigit() else DEFAULT_FLAKY_FAILURES


def reference_for(idempotency_key: str) -> str:
    return "ch_" + hashlib.sha256(idempotency_key.encode()).hexdigest()[:24]


def charge(*, token: str, amount: Decimal, idempotency_key: str, attempt: int) -> GatewayCharge:
    if token == TOKEN_DECLINED:
        raise CardDeclined("The card was declined", details={"decline_code": "generic_decline"})
    if token.startswith(TOKEN_FLAKY) and attempt <= _flaky_failures(token):
        raise GatewayUnavailable(f"Gateway timeout (attempt {attempt})")
    if token == TOKEN_HANG:
        time.sleep(settings.PAYMENT_GATEWAY_HANG_SECONDS)
    return GatewayCharge(reference=reference_for(idempotency_key), amount=amount)


def refund(*, reference: str, amount: Decimal) -> str:
    return "re_" + reference.removeprefix("ch_")
