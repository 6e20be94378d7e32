"""Pluggable SMS backends, chosen by the `SMS_BACKEND` setting (a dotted path)."""

from __future__ import annotations

import logging

from django.conf import settings
from django.utils.module_loading import import_string

logger = logging.getLogger(__name__)


class LoggingSmsBackend:
    """Writes the message to the log: the default until a real provider is configured."""

    def send(self, *, to: str, body: str) -> None:
        logger.info("SMS to %s: %s", to, body)


class MemorySmsBackend:
    """Keeps sent messages in `outbox`, like Django's locmem e-mail backend (tests)."""

    outbox: list[dict] = []

    def send(self, *, to: str, body: str) -> None:
        MemorySmsBackend.outbox.append({"to": to, "body": body})


def get_backend():
    return import_string(settings.SMS_BACKEND)()
