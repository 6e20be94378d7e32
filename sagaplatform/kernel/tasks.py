from typing import Any

from celery import shared_task

from . import outbox, retention


@shared_task(name="kernel.relay_outbox", ignore_result=True)
def relay_outbox(alias: str) -> int:
    """Publish whatever `alias`'s outbox still holds (the sweep's safety net)."""
    return outbox.relay_due(using=alias)


@shared_task(name="kernel.purge", ignore_result=True)
def purge(alias: str) -> dict[str, Any]:
    """Apply the retention to `alias`: published outbox rows and barrier rows of ended sagas."""
    return retention.purge(using=alias)
