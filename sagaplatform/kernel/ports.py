"""Read ports: how a service reads what another part of the platform owns without importing it.

The implementation is named in settings (the composition root), so `orders` can show its saga's
progress without `import orchestration`.
"""

from __future__ import annotations

from django.conf import settings
from django.utils.module_loading import import_string


def saga_summary(saga_id) -> dict | None:
    return import_string(settings.SAGA_SUMMARY_READER)(saga_id)
