"""Indexes that others cover, dropped: every step and event written paid for them. A lookup by
saga uses the unique (saga, name) and (saga, seq) indexes' first column, a filter on a saga's
state alone saga_state_created's (docs/ARCHITECTURE.md, "Indexes of the hot queries").

Only the indexes go: the foreign keys stay as they are (Django's own AlterField would drop and
add them again, checking every row)."""

import django.db.models.deletion
import django_fsm
from django.db import migrations, models

# The indexes Django named for `db_index` (the same names on PostgreSQL and SQLite), and how to
# build each again. `_like` is PostgreSQL's alone (a pattern index beside a varchar's).
INDEXES = {
    "orchestration_saga_state_fe7d4d34": ("orchestration_saga", '("state")'),
    "orchestration_saga_state_fe7d4d34_like": ("orchestration_saga", '("state" varchar_pattern_ops)'),
    "orchestration_sagastep_saga_id_67f504d8": ("orchestration_sagastep", '("saga_id")'),
    "orchestration_sagaevent_saga_id_d71def98": ("orchestration_sagaevent", '("saga_id")'),
}


def drop(apps, schema_editor):
    for name in INDEXES:
        schema_editor.execute(f'DROP INDEX IF EXISTS "{name}"')


def create(apps, schema_editor):
    for name, (table, columns) in INDEXES.items():
        if "varchar_pattern_ops" in columns and schema_editor.connection.vendor != "postgresql":
            continue
        schema_editor.execute(f'CREATE INDEX IF NOT EXISTS "{name}" ON "{table}" {columns}')


class Migration(migrations.Migration):
    dependencies = [
        ("orchestration", "0008_saga_history_retention"),
    ]

    operations = [
        migrations.SeparateDatabaseAndState(
            database_operations=[migrations.RunPython(drop, create)],
            state_operations=[
                migrations.AlterField(
                    model_name="saga",
                    name="state",
                    field=django_fsm.FSMField(
                        choices=[
                            ("pending", "Pending"),
                            ("running", "Running"),
                            ("confirming", "Confirming"),
                            ("compensating", "Compensating"),
                            ("completed", "Completed"),
                            ("compensated", "Compensated"),
                            ("failed", "Failed"),
                            ("parked", "Parked"),
                            ("cancelled", "Cancelled"),
                        ],
                        default="pending",
                        max_length=50,
                        protected=True,
                    ),
                ),
                migrations.AlterField(
                    model_name="sagaevent",
                    name="saga",
                    field=models.ForeignKey(
                        db_index=False,
                        on_delete=django.db.models.deletion.CASCADE,
                        related_name="events",
                        to="orchestration.saga",
                    ),
                ),
                migrations.AlterField(
                    model_name="sagastep",
                    name="saga",
                    field=models.ForeignKey(
                        db_index=False,
                        on_delete=django.db.models.deletion.CASCADE,
                        related_name="steps",
                        to="orchestration.saga",
                    ),
                ),
            ],
        ),
    ]
