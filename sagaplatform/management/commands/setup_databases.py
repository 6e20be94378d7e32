"""Create (PostgreSQL) and migrate every service database."""

from __future__ import annotations

import psycopg
from django.conf import settings
from django.core.management import call_command
from django.core.management.base import BaseCommand
from psycopg import sql


class Command(BaseCommand):
    help = "Create the PostgreSQL databases that do not exist yet, then migrate every alias."

    def add_arguments(self, parser):
        parser.add_argument("--recreate", action="store_true", help="drop the PostgreSQL databases first (benchmarks)")

    def handle(self, *args, recreate: bool, **options):
        settings.VAR_DIR.mkdir(parents=True, exist_ok=True)
        for alias, db in settings.DATABASES.items():
            if db["ENGINE"].endswith("postgresql"):
                self._create_postgres(alias, db, recreate=recreate)
        if recreate and settings.REDIS_URL:
            # Messages still queued for the dropped databases would land in the new ones.
            import redis

            redis.Redis.from_url(settings.CELERY_BROKER_URL).flushdb()
            self.stdout.write("emptied the broker's Redis database")
        for alias in settings.DATABASE_ALIASES:
            call_command("migrate", database=alias, interactive=False, verbosity=0)
            self.stdout.write(f"migrated {alias}")

    def _create_postgres(self, alias: str, db: dict, *, recreate: bool) -> None:
        params = {"dbname": "postgres", "user": db["USER"] or None, "password": db["PASSWORD"] or None}
        params |= {"host": db["HOST"] or None, "port": db["PORT"] or None}
        with psycopg.connect(**{k: v for k, v in params.items() if v}, autocommit=True) as conn:
            if recreate:
                conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(db["NAME"])))
            exists = conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", [db["NAME"]]).fetchone()
            if not exists:
                conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(db["NAME"])))
                self.stdout.write(f"created database {db['NAME']} for {alias}")
