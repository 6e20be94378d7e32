"""The periodic safety net: publish what the after-commit fast path could not.

Run by Celery beat in production (`orchestration.sweep` every SAGA_SWEEP_INTERVAL seconds) and by
a thread in the embedded mode. Every database's outbox is relayed, so a reply a service wrote
just before its worker died still reaches the orchestrator.
"""

from __future__ import annotations

import logging

from django.conf import settings

from sagaplatform.kernel import outbox

logger = logging.getLogger(__name__)


def sweep_once() -> dict:
    published = {}
    for alias in settings.DATABASE_ALIASES:
        try:
            published[alias] = outbox.relay_due(using=alias)
        except Exception:
            logger.exception("outbox relay failed for %s", alias)
    if any(published.values()):
        logger.info("sweep published %s", published)
    return published
