"""A cheaper reset between transactional tests on PostgreSQL (installed by tests/conftest.py).

A `transaction=True` test ends with Django's `flush` on each of the six databases: one
`TRUNCATE` of every table, then the `post_migrate` signal, which re-creates every content type
and permission the `TRUNCATE` removed. Measured here, that was about a second per test, and the
fast tier has hundreds of such tests. Three changes, for the tests only:

* the tables are emptied with `DELETE` in one round trip per database. On the handful of rows a
  test leaves, `DELETE` is far cheaper than `TRUNCATE` (which swaps every table's files and takes
  an exclusive lock). Django's foreign keys are `DEFERRABLE INITIALLY DEFERRED`, so the order of
  the deletes does not matter inside the flush's transaction;
* content types and permissions are kept, so nothing needs re-creating and `post_migrate` is not
  sent. They come from the models, which no test changes; rows that link them to users and
  groups are deleted as before;
* the statements are built once per database: listing its tables is a catalogue query, and
  Django's flush also imports every app's `management` module each time, for `post_migrate`.

Unlike `TRUNCATE`, which waits for every other transaction on a table, the `DELETE`s can
deadlock with a process a test started that is still writing; the flush is then run again.

What a test sees afterwards is what it saw before: every table empty but those two, which hold
exactly what `post_migrate` would have written back.
"""

from __future__ import annotations

from django.core.management import sql as management_sql
from django.core.management.color import no_style
from django.core.management.commands import flush
from django.db import OperationalError, connections
from psycopg.errors import DeadlockDetected

KEPT = frozenset({"django_content_type", "auth_permission"})


def install() -> None:
    from django.db.backends.postgresql.operations import DatabaseOperations

    def sql_flush(self, style, tables, *, reset_sequences=False, allow_cascade=False):
        emptied = [table for table in tables if table not in KEPT]
        if reset_sequences:
            # Asked for by `call_command("flush")` (its default): Django's own TRUNCATE ... RESTART
            # IDENTITY, of every table but the kept ones (post_migrate is not sent to re-create them).
            return original(self, style, emptied, reset_sequences=True, allow_cascade=allow_cascade)
        if not emptied:
            return []
        quote = self.quote_name
        # Table names from the models, quoted: no input reaches this statement.
        deletes = " ".join(f"DELETE FROM {quote(table)};" for table in emptied)  # noqa: S608
        return ["SET CONSTRAINTS ALL DEFERRED; " + deletes]

    original = DatabaseOperations.sql_flush
    DatabaseOperations.sql_flush = sql_flush  # type: ignore[method-assign]

    statements: dict[tuple, list[str]] = {}

    class Command(flush.Command):
        def handle(self, **options):
            # What post_migrate would have done for this process: forget the cached content types
            # (a process the test started may have re-created them with new ids meanwhile).
            from django.contrib.contenttypes.models import ContentType

            ContentType.objects.clear_cache()
            connection = connections[options["database"]]
            if connection.vendor != "postgresql":
                return super().handle(**options)
            # Content types and permissions survive the flush above: nothing to re-create, so
            # no post_migrate (nor the import of every app's management module it needs). The
            # statements depend only on the tables, which no test adds: built once per database
            # (listing the tables is a catalogue query).
            reset_sequences, allow_cascade = options.get("reset_sequences", True), options.get("allow_cascade", False)
            key = (connection.alias, reset_sequences, allow_cascade)
            if key not in statements:
                statements[key] = management_sql.sql_flush(
                    no_style(), connection, reset_sequences=reset_sequences, allow_cascade=allow_cascade
                )
            for attempt in range(1, 6):
                try:
                    connection.ops.execute_sql_flush(statements[key])
                    return
                except OperationalError as error:
                    # A process the test started (a server, a worker) may still be writing: its
                    # transaction and the flush's DELETEs can deadlock, and PostgreSQL aborts one
                    # of them. The flush's transaction was rolled back: run it again.
                    if attempt == 5 or not isinstance(error.__cause__, DeadlockDetected):
                        raise

    flush.Command = Command  # type: ignore[misc]
