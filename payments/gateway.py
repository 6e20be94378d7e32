"""A simulated card gateway whose test tokens behave like a card network's test cards.

| token                  | behaviour                                                    |
|------------------------|--------------------------------------------------------------|
| `tok_visa`             | always succeeds                                              |
| `tok_declined`         | declined: a business failure, never retried                  |
| `tok_flaky` / `tok_flaky_N` | fails transiently on the first N attempts (default 2), then succeeds |
| `tok_hang`             | blocks for `PAYMENT_GATEWAY_HANG_SECONDS`, past any step timeout, then succeeds |

Any other token is treated as `tok_visa`, like a sandbox accepting any well-formed card. The
gateway is keyed by an idempotency key: the same key always yields the same charge, taken once.

Like a real gateway it keeps its own records, apart from the platform's databases (so they never
roll back with a local transaction): in the Django cache, which every worker shares in the
production mode (Redis). A charge is recorded under its idempotency key the first time it is
taken, a refund under its charge's reference the first time it is made; a repeated call returns
the record. `find_charge` asks the gateway what it took under a key, as a reconciliation does.
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass
from decimal import Decimal

from django.conf import settings
from django.core.cache import cache

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


# How long the simulated gateway keeps its records (a real one keeps them for good).
RECORD_SECONDS = 90 * 24 * 3600


def _charge_key(idempotency_key: str) -> str:
    return f"gateway:charge:{idempotency_key}"


def _refund_key(reference: str) -> str:
    return f"gateway:refund:{reference}"


def find_charge(idempotency_key: str) -> GatewayCharge | None:
    """What the gateway took under this idempotency key, or None if it took nothing."""
    record = cache.get(_charge_key(idempotency_key))
    return GatewayCharge(reference=record["reference"], amount=Decimal(record["amount"])) if record else None


def find_charges(idempotency_keys: list[str]) -> dict[str, GatewayCharge]:
    """`find_charge` for many keys at once: key -> what the gateway took (keys it took nothing
    under are left out)."""
    found = cache.get_many([_charge_key(k) for k in idempotency_keys])
    return {
        k: GatewayCharge(reference=r["reference"], amount=Decimal(r["amount"]))
        for k in idempotency_keys
        if (r := found.get(_charge_key(k)))
    }


def find_refunds(references: list[str]) -> dict[str, str]:
    """`find_refund` for many charges at once: charge reference -> refund reference."""
    found = cache.get_many([_refund_key(r) for r in references])
    return {r: str(found[_refund_key(r)]["reference"]) for r in references if _refund_key(r) in found}


def find_refund(reference: str) -> str | None:
    """The reference of the refund of this charge, or None if it was not refunded."""
    record = cache.get(_refund_key(reference))
    return str(record["reference"]) if record else None


def shares_records() -> bool:
    """Whether every process sees the same records (a shared cache, not one per process; in
    the embedded mode only the serving process itself sees them)."""
    return "LocMemCache" not in settings.CACHES["default"]["BACKEND"]


def charge(*, token: str, amount: Decimal, idempotency_key: str, attempt: int) -> GatewayCharge:
    taken = find_charge(idempotency_key)
    if taken is not None:
        return taken  # the same key: the charge already taken, not a second one
    if token == TOKEN_DECLINED:
        raise CardDeclined("The card was declined", details={"decline_code": "generic_decline"})
    if token.startswith(TOKEN_FLAKY) and attempt <= _flaky_failures(token):
        raise GatewayUnavailable(f"Gateway timeout (attempt {attempt})")
    if token == TOKEN_HANG:
        time.sleep(settings.PAYMENT_GATEWAY_HANG_SECONDS)
    record = {"reference": reference_for(idempotency_key), "amount": str(amount)}
    cache.add(_charge_key(idempotency_key), record, timeout=RECORD_SECONDS)  # the first call wins
    return find_charge(idempotency_key) or GatewayCharge(reference=record["reference"], amount=amount)


def refund(*, reference: str, amount: Decimal) -> str:
    """Refund a charge in full. Idempotent by the charge's reference: refunded once."""
    record = {"reference": "re_" + reference.removeprefix("ch_"), "amount": str(amount)}
    cache.add(_refund_key(reference), record, timeout=RECORD_SECONDS)
    return find_refund(reference) or record["reference"]
