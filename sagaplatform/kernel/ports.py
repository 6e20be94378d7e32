"""Ports: how a service reaches what another part of the platform owns without importing it.

The implementation is named in settings (the composition root), so `orders` can show its saga's
progress without `import orchestration`.
"""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Any, cast

from django.conf import settings
from django.utils.module_loading import import_string

SagaId = uuid.UUID | str


def saga_summary(saga_id: SagaId) -> dict[str, Any] | None:
    summary: dict[str, Any] | None = import_string(settings.SAGA_SUMMARY_READER)(saga_id)
    return summary


def saga_plan(*, mode: str) -> list[dict[str, Any]]:
    """The steps (all pending) of the saga an order of `mode` runs, for an order read before its
    saga has started."""
    return cast("list[dict[str, Any]]", import_string(settings.SAGA_PLAN_READER)(mode))


def sagas_known(saga_ids: list[Any]) -> set[str]:
    """Which of these sagas the orchestrator has a record of (for a choreography: the tracker)."""
    return cast("set[str]", import_string(settings.SAGA_EXISTENCE_READER)(saga_ids))


def saga_cancel(*, saga_id: SagaId, context: dict[str, Any], actor: str, reason: str = "") -> Any:
    """Ask the engine to cancel a saga; raises an ApiError (409) when it cannot be cancelled.

    `context` is what the caller knows of the saga's context (order id, customer e-mail), used
    if the cancel overtakes the saga's start."""
    return import_string(settings.SAGA_CANCELLER)(saga_id=saga_id, context=context, actor=actor, reason=reason)


def stock_available() -> dict[str, int]:
    """SKU -> units available now (on hand less reserved), for display only: the saga's
    reservation is what decides."""
    return cast("dict[str, int]", import_string(settings.STOCK_AVAILABILITY_READER)())


def sagas_ended_before(saga_ids: set[str], before: datetime) -> set[str]:
    """Which of these sagas ended (completed, compensated, failed or cancelled) before `before`;
    for retention, which keeps every row of a saga still running, parked or unknown."""
    if not saga_ids:
        return set()
    return cast("set[str]", import_string(settings.SAGA_ENDED_READER)(saga_ids, before))


def stock_contention() -> dict[str, Any]:
    """Optimistic-lock conflicts on stock per minute and the hottest SKUs, as the inventory
    service recorded them (`inventory/contention.py`)."""
    return cast("dict[str, Any]", import_string(settings.STOCK_CONTENTION_READER)())
