from django.conf import settings
from django.core.management.base import BaseCommand

from orders.services import idempotency_keys_purge


class Command(BaseCommand):
    help = "Delete order Idempotency-Keys older than IDEMPOTENCY_KEY_TTL (the orders stay). Safe to run any time."

    def handle(self, *args, **options):
        purged = idempotency_keys_purge()
        self.stdout.write(f"purged {purged} idempotency keys older than {settings.IDEMPOTENCY_KEY_TTL} s")
