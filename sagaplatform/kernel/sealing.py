"""Sealing a secret for the one service that may read it (the payment token for payments).

The orders service never keeps the customer's card token: it seals it into the message that
registers the payment method with the payments service, and everything else carries the opaque
reference (`pm_<uuid>`). Sealed (Fernet: AES-128-CBC with an HMAC), the token is unreadable in
the orders outbox row and on the broker; only the payments service unseals it, and keeps it in
its own database. The key is `PAYMENT_TOKEN_SEAL_KEY` (a Fernet key), derived from
`SECRET_KEY` when unset. A real deployment would seal with the payments service's public key, so
that the orders service could seal but never unseal.
"""

from __future__ import annotations

import base64
import hashlib
from functools import cache

from cryptography.fernet import Fernet, InvalidToken
from django.conf import settings

__all__ = ["InvalidToken", "seal", "unseal"]


@cache
def _fernet(key: str | bytes) -> Fernet:
    if not key:
        key = base64.urlsafe_b64encode(hashlib.sha256(f"payment-token-seal:{settings.SECRET_KEY}".encode()).digest())
    return Fernet(key)


def seal(secret: str) -> str:
    return _fernet(getattr(settings, "PAYMENT_TOKEN_SEAL_KEY", "")).encrypt(secret.encode()).decode()


def unseal(sealed: str) -> str:
    """The secret; raises `InvalidToken` if it was not sealed with this key or was altered."""
    return _fernet(getattr(settings, "PAYMENT_TOKEN_SEAL_KEY", "")).decrypt(sealed.encode()).decode()
