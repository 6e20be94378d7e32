"""`manage.py bench_feed`: the live feed from commit to a painted dashboard (see feed_bench.py)."""

from __future__ import annotations

import json

from django.conf import settings
from django.core.management.base import BaseCommand, CommandError

from loadtest import feed_bench


class Command(BaseCommand):
    help = "Measure the live feed: events/s delivered to a browser and commit-to-paint delay."

    def add_arguments(self, parser):
        parser.add_argument("--rates", default="100,1000,10000", help="offered events per second, comma separated")
        parser.add_argument("--seconds", type=float, default=5.0, help="how long each rate is offered")
        parser.add_argument("--sagas", type=int, default=1000, help="at most this many distinct sagas")
        parser.add_argument("--port", type=int, default=8765)
        parser.add_argument("--json", dest="as_json", action="store_true", help="print the figures as JSON too")

    def handle(self, *args, rates, seconds, sagas, port, as_json: bool, **options):
        if settings.EMBEDDED_BROKER:
            raise CommandError("The feed benchmark runs on the production stack: set DATABASE_URL and REDIS_URL.")
        results = feed_bench.run(
            rates=[int(r) for r in rates.split(",")], seconds=seconds, sagas=sagas, port=port, out=self.stdout
        )
        if as_json:
            self.stdout.write(json.dumps(results, indent=2))
