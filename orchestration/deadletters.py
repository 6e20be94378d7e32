"""Alerts for dead letters: a message a worker recorded and acknowledged instead of running
(`sagaplatform.kernel.deadletters`). Each database keeps its own; this reads them through the
kernel, as the audit reads per-database facts, and raises one alert each."""

from __future__ import annotations

from django.conf import settings

from sagaplatform.kernel import deadletters

from .models import Alert

DB = "default"


def alert_dead_letters() -> int:
    raised = 0
    for alias in settings.DATABASE_ALIASES:
        letters = deadletters.unalerted(using=alias)
        if not letters:
            continue
        # The alert first, then the mark: a crash in between raises an alert twice, never zero times.
        Alert.objects.using(DB).bulk_create(
            Alert(
                kind=Alert.Kind.DEAD_LETTER,
                message=(
                    f"Dead letter #{letter.id} in {alias}: {letter.get_reason_display()} on queue "
                    f"{letter.queue or '?'} (task {letter.task or '?'}, {letter.size} bytes): {letter.error}"
                )[:500],
            )
            for letter in letters
        )
        deadletters.mark_alerted(using=alias, ids=[letter.id for letter in letters])
        raised += len(letters)
    return raised
