from django.conf import settings
from django.core.management.base import BaseCommand, CommandError

from sagaplatform.demo import CATALOGUE, load_demo_data


class Command(BaseCommand):
    help = "Load the demo catalogue, stock, customer and operator (idempotent)."

    def add_arguments(self, parser):
        parser.add_argument("--force", action="store_true", help="load even with DJANGO_DEBUG off")

    def handle(self, *args, force: bool, **options):
        if not settings.DEBUG and not force:
            # The demo operator is a superuser with a published password.
            raise CommandError("refusing to load demo users with DJANGO_DEBUG off; pass --force to insist")
        users = load_demo_data()
        self.stdout.write(f"Demo catalogue: {', '.join(sku for sku, *_ in CATALOGUE)}")
        for username, password in users.items():
            self.stdout.write(f"  login: {username} / {password}")
