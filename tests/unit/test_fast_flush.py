"""The test-only flush (`tests/fast_flush.py`) keeps what `post_migrate` would have re-created:
a transactional test, or one that calls `flush` itself, still finds the permissions."""

from __future__ import annotations

import pytest
from django.contrib.auth.models import Permission
from django.core.management import call_command
from django.db import connections

from orders.models import Product
from tests.conftest import ON_POSTGRES, make_operator

pytestmark = [
    pytest.mark.django_db(transaction=True, databases="__all__"),
    pytest.mark.skipif(not ON_POSTGRES, reason="the faster flush is installed on PostgreSQL only"),
]


@pytest.mark.parametrize(
    "options",
    [{}, {"reset_sequences": True}, {"reset_sequences": False}],
    ids=["flush-command", "flush-command-resetting-sequences", "between-tests"],
)
def test_a_flush_empties_the_tables_and_keeps_the_permissions(options):
    Product.objects.using("orders").create(sku="SKU-FLUSH", name="Flushed", unit_price="1.00")
    make_operator("before")
    for alias in ("default", "orders"):
        call_command("flush", database=alias, interactive=False, verbosity=0, **options)

    assert not Product.objects.using("orders").exists()
    assert Permission.objects.filter(content_type__app_label="orchestration", codename="operate_saga").exists()
    assert make_operator("after").has_perm("orchestration.operate_saga")


def test_a_flush_that_deadlocks_with_a_process_still_writing_runs_again(monkeypatch):
    """A server or worker a test started may write while the flush deletes: PostgreSQL aborts one
    of the two transactions, and when it is the flush's, the flush runs again."""
    ops = connections["orders"].ops
    execute = ops.execute_sql_flush
    calls = []

    def deadlocking_once(sql_list):
        calls.append(sql_list)
        if len(calls) == 1:
            with connections["orders"].cursor() as cursor:  # a real DeadlockDetected, as psycopg raises it
                cursor.execute("DO $$ BEGIN RAISE EXCEPTION USING ERRCODE = '40P01'; END $$")
        return execute(sql_list)

    monkeypatch.setattr(ops, "execute_sql_flush", deadlocking_once)
    Product.objects.using("orders").create(sku="SKU-FLUSH", name="Flushed", unit_price="1.00")

    call_command("flush", database="orders", interactive=False, verbosity=0)

    assert len(calls) == 2
    assert not Product.objects.using("orders").exists()
