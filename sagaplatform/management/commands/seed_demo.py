from django.core.management.base import BaseCommand

from sagaplatform.demo import CATALOGUE, load_demo_data


class Command(BaseCommand):
    help = "Load the demo catalogue, stock, customer and operator (idempotent)."

    def handle(self, *args, **options):
        users = load_demo_data()
        self.stdout.write(f"Demo catalogue: {', '.join(sku for sku, *_ in CATALOGUE)}")
        for username, password in users.items():
            self.stdout.write(f"  login: {username} / {password}")
