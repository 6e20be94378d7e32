"""Ports: how a service reaches what another part of the platform owns without importing it.

The implementation is named in settings (the composition root), so `orders` can show its saga's
progress without `import orchestration`.
"""

from __future__ import annotations

from django.conf import settings
from django.utils.module_loading import import_string


def saga_summary(saga_id) -> dict | None:
    return import_string(settings.SAGA_SUMMARY_READER)(saga_id)


def sagas_known(saga_ids: list) -> set[str]:
    """Which of these sagas the orchestrator has a record of (for a choreography: the tracker)."""
    return import_string(settings.SAGA_EXISTENCE_READER)(saga_ids)


def saga_cancel(*, saga_id, context: dict, actor: str, reason: str = ""):
    """Ask the engine to cancel a saga; raises an ApiError (409) when it cannot be cancelled.

    `context` is what the caller knows of the saga's context (order id, customer e-mail), used
    if the cancel overtakes the saga's start."""
    return import_string(settings.SAGA_CANCELLER)(saga_id=saga_id, context=context, actor=actor, reason=reason)


def stock_available() -> dict[str, int]:
    """SKU -> units available now (on hand less reserved), for display only: the saga's
    reservation is what decides."""
    return import_string(settings.STOCK_AVAILABILITY_READER)()


def sagas_ended_before(saga_ids: set[str], before) -> set[str]:
    """Which of these sagas ended (completed, compensated, failed or cancelled) before `before`;
    for retention, which keeps every row of a saga still running, parked or unknown."""
    if not saga_ids:
        return set()
    return import_string(settings.SAGA_ENDED_READER)(saga_ids, before)


def stock_contention() -> dict:
    """Optimistic-lock conflicts on stock per minute and the hottest SKUs, as the inventory
    service recorded them (`inventory/contention.py`)."""
    return import_string(settings.STOCK_CONTENTION_READER)()
