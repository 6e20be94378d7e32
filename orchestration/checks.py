"""`manage.py check --database default`: a saga definition whose content changed under the
version label that sagas still running use (`SagaDefinition.version` not bumped).

A saga runs the exact definition it started on (its content hash, `definitions.for_saga`), so
such a change never breaks it; but two step graphs under one label make the dashboard, the API
and the operators' reading of "place_order v3" ambiguous. The check needs the database (it reads
the snapshots and the sagas), hence the `database` tag: `make lint` runs it.
"""

from __future__ import annotations

from django.core.checks import Error, Tags, Warning, register
from django.db import DatabaseError

DB = "default"


def stale_versions() -> list[str]:
    """One line per definition whose code content differs from a snapshot of the same label
    that an unfinished saga still runs."""
    from .definitions import DEFINITIONS
    from .models import DefinitionSnapshot, Saga

    found = []
    for name, definition in sorted(DEFINITIONS.items()):
        stale = (
            DefinitionSnapshot.objects.using(DB)
            .filter(name=name, version=definition.version)
            .exclude(digest=definition.digest)
        )
        for snapshot in stale:
            running = (
                Saga.objects.using(DB)
                .filter(definition_hash=snapshot.digest)
                .exclude(state__in=Saga.TERMINAL_STATES)
                .count()
            )
            if running:
                found.append(
                    f"{definition.label} changed (code {definition.digest[:12]}, stored {snapshot.digest[:12]}) "
                    f"while {running} unfinished saga(s) run the stored content under the same label"
                )
    return found


@register(Tags.database)
def definition_versions(app_configs=None, databases=None, **kwargs):
    if not databases or DB not in databases:
        return []
    try:
        stale = stale_versions()
    except DatabaseError as exc:  # not migrated yet: nothing can reference a version
        return [Warning(f"saga definition versions not checked: {exc}", id="orchestration.W001")]
    return [
        Error(line, hint="Bump the definition's `version` (docs/ARCHITECTURE.md, section 5).", id="orchestration.E001")
        for line in stale
    ]
