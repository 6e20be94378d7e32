from django.conf import settings
from django.core.management.base import BaseCommand, CommandError

from sagaplatform.demo import CATALOGUE, load_catalogue, load_demo_data


class Command(BaseCommand):
    help = "Load the demo catalogue, stock, customer and operator (idempotent)."

    def add_arguments(self, parser):
        parser.add_argument("--force", action="store_true", help="load even with DJANGO_DEBUG off")
        parser.add_argument(
            "--catalogue-only", action="store_true", help="only the products and their stock, no users (production)"
        )

    def handle(self, *args, force: bool, catalogue_only: bool, **options):
        if catalogue_only:
            load_catalogue()
            self.stdout.write(f"Demo catalogue: {', '.join(sku for sku, *_ in CATALOGUE)}")
            return
        if not settings.DEBUG and not force:
            # The demo operator is a superuser with a published password.
            raise CommandError("refusing to load demo users with DJANGO_DEBUG off; pass --force to insist")
        users = load_demo_data()
        self.stdout.write(f"Demo catalogue: {', '.join(sku for sku, *_ in CATALOGUE)}")
        for username, password in users.items():
            self.stdout.write(f"  login: {username} / {password}")
