"""Per-database facts the cross-service audit needs from the kernel tables."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

from .clock import db_now
from .models import Barrier, OutboxMessage


def barrier_rows(*, using: str) -> list[tuple[str, str, str, dict[str, Any] | None, object]]:
    return [
        (str(saga_id), step, op, outcome, created_at)
        for saga_id, step, op, outcome, created_at in Barrier.objects.using(using).values_list(
            "saga_id", "step", "op", "outcome", "created_at"
        )
    ]


def stale_outbox(*, using: str, older_than: timedelta = timedelta(seconds=30)) -> int:
    return (
        OutboxMessage.objects.using(using)
        .filter(published_at__isnull=True, available_at__lte=db_now(using) - older_than)
        .count()
    )
