"""Serve the platform over ASGI (daphne); in the embedded mode, with its workers in-process."""

from __future__ import annotations

from daphne.cli import CommandLineInterface
from django.conf import settings
from django.core.management.base import BaseCommand


class Command(BaseCommand):
    help = "Serve HTTP and websockets; start in-process workers when SAGA_EMBEDDED_WORKER is on."

    def add_arguments(self, parser):
        parser.add_argument("--host", default="127.0.0.1")
        parser.add_argument("--port", type=int, default=8000)
        parser.add_argument("--concurrency", type=int, default=4, help="embedded worker threads")

    def handle(self, *args, host: str, port: int, concurrency: int, **options):
        if settings.SAGA_EMBEDDED_WORKER:
            from sagaplatform import embedded

            embedded.start(concurrency=concurrency)
            self.stdout.write(f"Embedded Celery worker ({concurrency} threads) and beat started.")
        self.stdout.write(f"Serving on http://{host}:{port}/")
        CommandLineInterface().run(
            [
                "-b",
                host,
                "-p",
                str(port),
                "--verbosity",
                "1",
                settings.ASGI_APPLICATION.replace(".application", ":application"),
            ]
        )
