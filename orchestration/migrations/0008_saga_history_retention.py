"""Cost flat as data grows: the saga retention's mark and the indexes the hot reads need on a
large history (docs/ARCHITECTURE.md, "Indexes of the hot queries")."""

from django.db import migrations, models

BRIN = "saga_event_created_brin"


def create_brin(apps, schema_editor):
    """The timeline's time index, PostgreSQL only: a BRIN index (a few pages, nearly free to
    keep up on insert, since events are appended in time order) serves the overview's and the
    alerting's "events of the last minutes". SQLite, the embedded mode, has no BRIN; its small
    tables are scanned."""
    if schema_editor.connection.vendor == "postgresql":
        schema_editor.execute(
            f"CREATE INDEX IF NOT EXISTS {BRIN} ON orchestration_sagaevent USING brin (created_at) "
            "WITH (autosummarize = on)"
        )


def drop_brin(apps, schema_editor):
    if schema_editor.connection.vendor == "postgresql":
        schema_editor.execute(f"DROP INDEX IF EXISTS {BRIN}")


class Migration(migrations.Migration):
    dependencies = [
        ("orchestration", "0007_definition_versions"),
    ]

    operations = [
        migrations.AddField(
            model_name="saga",
            name="history_purged_at",
            field=models.DateTimeField(blank=True, null=True),
        ),
        migrations.AddIndex(
            model_name="saga",
            index=models.Index(
                condition=models.Q(("finished_at__isnull", False), ("history_purged_at__isnull", True)),
                fields=["finished_at"],
                name="saga_finished_unpurged",
            ),
        ),
        migrations.RunPython(create_brin, drop_brin),
    ]
