"""Retention by hand: `manage.py purge` (beat runs the same per database, `kernel.purge`)."""

from __future__ import annotations

from datetime import timedelta

from django.conf import settings
from django.core.management.base import BaseCommand, CommandError

from sagaplatform.kernel import retention


class Command(BaseCommand):
    help = (
        "Delete published outbox rows older than OUTBOX_RETENTION and the barrier rows of sagas that ended "
        "more than BARRIER_RETENTION ago (never less than the safe minimum). Unpublished rows and rows of "
        "sagas still running or parked are kept. Safe to run any time."
    )

    def add_arguments(self, parser):
        parser.add_argument("--database", action="append", choices=settings.DATABASE_ALIASES, help="default: all")
        parser.add_argument("--outbox-age", type=float, help="seconds (default OUTBOX_RETENTION)")
        parser.add_argument(
            "--barrier-age", type=float, help="seconds (default BARRIER_RETENTION); raised to the safe minimum"
        )

    def handle(self, *args, database=None, outbox_age=None, barrier_age=None, **options):
        if (outbox_age is not None and outbox_age < 0) or (barrier_age is not None and barrier_age < 0):
            raise CommandError("ages are seconds, 0 or more")
        outbox = retention.outbox_age() if outbox_age is None else timedelta(seconds=outbox_age)
        barrier = retention.barrier_age()
        if barrier_age is not None:
            barrier = max(timedelta(seconds=barrier_age), retention.minimum_barrier_age())
        for alias in database or settings.DATABASE_ALIASES:
            purged_outbox = retention.purge_outbox(using=alias, older_than=outbox)
            purged_barrier = retention.purge_barrier(using=alias, older_than=barrier)
            self.stdout.write(
                f"{alias}: purged {purged_outbox} outbox rows published over {outbox.total_seconds():.0f} s ago, "
                f"{purged_barrier} barrier rows of sagas ended over {barrier.total_seconds():.0f} s ago"
            )
