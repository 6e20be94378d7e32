"""What autovacuum would do, for a benchmark on a PostgreSQL server where it is off.

Production PostgreSQL runs autovacuum: it analyzes a table once `autovacuum_analyze_threshold`
+ `autovacuum_analyze_scale_factor` x its rows have changed since the last analyze (50 + 10 % by
default), and vacuums it once its dead rows pass the vacuum threshold (50 + 20 %), or its rows
inserted since the last vacuum pass the insert threshold (1,000 + 20 %). An analyze also makes
every session plan again the prepared statements that read the table.

A server with autovacuum off (CI's: `autovacuum = off`) does none of it. The bench's tables start
empty and grow by hundreds of rows a second, and each worker keeps the plan it prepared while a
table was a page or two: a sequential scan, for every lookup, for the rest of the run. Measured
here with 1,500 orders in one run (saga only, before this): 31,000 rows read by sequential scan
per order, against 4,984 at 200 orders; the saga's throughput fell from 28-31 to 24 orders/s.

`Autovacuum` checks every bench database each `interval` seconds with the server's own
thresholds, and analyzes or vacuums what they name, as autovacuum would. Its checks are far
more frequent than autovacuum's (`autovacuum_naptime`, a minute): the bench's tables grow in
seconds what a deployment's grow in hours. Its work is PostgreSQL's, so the bench's CPU figures
count it, as they would count autovacuum's workers.
"""

from __future__ import annotations

import logging
import threading
from typing import Any

from django.conf import settings
from django.db import connections

logger = logging.getLogger(__name__)

# The tables past autovacuum's thresholds, with the server's own settings (reltuples is -1 for a
# table never analyzed or vacuumed: counted as 0, as autovacuum does).
DUE_SQL = """
SELECT quote_ident(s.schemaname) || '.' || quote_ident(s.relname),
       s.n_dead_tup > current_setting('autovacuum_vacuum_threshold')::float8
                      + current_setting('autovacuum_vacuum_scale_factor')::float8 * greatest(c.reltuples, 0)
       OR s.n_ins_since_vacuum > current_setting('autovacuum_vacuum_insert_threshold')::float8
                      + current_setting('autovacuum_vacuum_insert_scale_factor')::float8 * greatest(c.reltuples, 0),
       s.n_mod_since_analyze > current_setting('autovacuum_analyze_threshold')::float8
                      + current_setting('autovacuum_analyze_scale_factor')::float8 * greatest(c.reltuples, 0)
FROM pg_stat_user_tables s JOIN pg_class c ON c.oid = s.relid
"""


def postgres_aliases() -> list[str]:
    return [a for a in settings.DATABASE_ALIASES if connections[a].vendor == "postgresql"]


def server_runs_it(alias: str) -> bool:
    with connections[alias].cursor() as cursor:
        cursor.execute("SELECT current_setting('autovacuum')::bool")
        return bool(cursor.fetchone()[0])


def mode(*, enabled: bool) -> str:
    """Who does autovacuum's work in the bench: "server", "emulated" (`Autovacuum`), "off" (the
    server does not and the bench was told not to), or "none" (no PostgreSQL database)."""
    aliases = postgres_aliases()
    if not aliases:
        return "none"
    if server_runs_it(aliases[0]):
        return "server"
    return "emulated" if enabled else "off"


def due(alias: str) -> list[tuple[str, str]]:
    """(table, "VACUUM (ANALYZE)" or "ANALYZE") for each table of `alias` past the thresholds."""
    with connections[alias].cursor() as cursor:
        cursor.execute(DUE_SQL)
        rows = cursor.fetchall()
    return [
        (table, "VACUUM (ANALYZE)" if vacuum else "ANALYZE") for table, vacuum, analyze in rows if vacuum or analyze
    ]


def run_once(aliases: list[str]) -> list[str]:
    """Vacuum or analyze every table due in `aliases`; return what ran ("alias: COMMAND table")."""
    done = []
    for alias in aliases:
        for table, command in due(alias):
            with connections[alias].cursor() as cursor:
                cursor.execute(f"{command} {table}")
            done.append(f"{alias}: {command} {table}")
    return done


class Autovacuum:
    """While the block runs, do autovacuum's work on every PostgreSQL database of the bench if
    the server does not (`active` says whether it does). `ran` lists what it ran."""

    def __init__(self, *, interval: float = 1.0, enabled: bool = True) -> None:
        self.interval = interval
        self.aliases = postgres_aliases()
        self.active = mode(enabled=enabled) == "emulated"
        self.ran: list[str] = []
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> Autovacuum:
        if self.active:
            self._thread = threading.Thread(target=self._loop, name="bench-autovacuum", daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()

    def _loop(self) -> None:
        try:
            while not self._stop.wait(self.interval):
                try:
                    self.ran += run_once(self.aliases)
                except Exception:  # a table dropped mid-check: the next pass sees the new state
                    logger.warning("bench autovacuum pass failed", exc_info=True)
        finally:
            connections.close_all()
