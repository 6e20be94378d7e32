"""Retention of finished sagas by hand: `manage.py purge_sagas` (beat runs the same,
`orchestration.purge_sagas`)."""

from __future__ import annotations

from datetime import timedelta

from django.core.management.base import BaseCommand, CommandError

from orchestration import retention


class Command(BaseCommand):
    help = (
        "Delete the step-level timeline (the engine's events) of sagas that ended more than SAGA_RETENTION_DAYS "
        "(or --days) ago, in batches. Sagas running or parked, the sagas and steps themselves, saga-level events "
        "and operators' events are kept. Safe to run any time; running it again finds nothing more."
    )

    def add_arguments(self, parser):
        parser.add_argument("--days", type=float, help="age in days (default SAGA_RETENTION_DAYS; 0 there: off)")
        parser.add_argument("--batch", type=int, default=retention.BATCH, help="sagas per transaction")
        parser.add_argument("--max-batches", type=int, help="stop after this many batches (default: all)")

    def handle(self, *args, days=None, batch, max_batches=None, **options):
        if days is not None and days <= 0:
            raise CommandError("--days must be more than 0")
        if batch < 1 or (max_batches is not None and max_batches < 1):
            raise CommandError("--batch and --max-batches must be at least 1")
        age = timedelta(days=days) if days is not None else retention.retention_age()
        if age is None:
            self.stdout.write("SAGA_RETENTION_DAYS is 0 (keep forever) and no --days: nothing purged")
            return
        result = retention.purge_sagas(older_than=age, batch=batch, max_batches=max_batches)
        self.stdout.write(
            f"purged {result['events']} events of {result['sagas']} sagas ended over {age.days} days ago "
            f"({result['batches']} batches)"
        )
