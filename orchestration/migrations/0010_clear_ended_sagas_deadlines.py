"""An ended saga keeps no deadline (`engine.run.flush_many` clears it since): the ones that ended
compensated or failed before kept theirs, and with them an entry each in `saga_deadline_open`,
the sweeper's index of open sagas. Cleared here once."""

from django.db import migrations

ENDED = ("completed", "compensated", "failed", "cancelled")


def clear(apps, schema_editor):
    Saga = apps.get_model("orchestration", "Saga")
    Saga.objects.using(schema_editor.connection.alias).filter(state__in=ENDED, deadline_at__isnull=False).update(
        deadline_at=None
    )


class Migration(migrations.Migration):
    dependencies = [
        ("orchestration", "0009_drop_redundant_indexes"),
    ]

    operations = [migrations.RunPython(clear, migrations.RunPython.noop)]
