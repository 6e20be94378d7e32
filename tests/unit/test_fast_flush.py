"""The test-only flush (`tests/fast_flush.py`) keeps what `post_migrate` would have re-created:
a transactional test, or one that calls `flush` itself, still finds the permissions."""

from __future__ import annotations

import pytest
from django.contrib.auth.models import Permission
from django.core.management import call_command

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
