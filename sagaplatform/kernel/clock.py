"""The database clock: every deadline, lease and retry time is computed and compared with it.

Workers' clocks may disagree; the database each decision is written to has one clock. On
PostgreSQL that is `clock_timestamp()`; SQLite runs in the same process as its callers, so the
process clock is the database's.
"""

from __future__ import annotations

from datetime import datetime

from django.db import connections
from django.utils import timezone


def db_now(using: str) -> datetime:
    connection = connections[using]
    if connection.vendor != "postgresql":
        return timezone.now()
    with connection.cursor() as cursor:
        cursor.execute("SELECT clock_timestamp()")
        now: datetime = cursor.fetchone()[0]
        return now
