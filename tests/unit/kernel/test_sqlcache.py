"""psycopg's parse of long statements is cached (sagaplatform/kernel/sqlcache.py): a statement
over psycopg's own limits (4,096 bytes, 50 parameters), run again with other values, is parsed
once; one too long for the cache is parsed every time; and the statements still run right."""

from __future__ import annotations

import pytest
from django.db import connections

from sagaplatform.kernel import sqlcache

pytestmark = [pytest.mark.postgres, pytest.mark.django_db(transaction=True, databases="__all__")]


def values_statement(rows: int) -> str:
    """One `SELECT` of `rows` rows of three parameters each: 3 x `rows` parameters."""
    rows_sql = ", ".join(["(%s::int, %s::int, %s::int)"] * rows)
    return f"SELECT sum(a + b + c) FROM (VALUES {rows_sql}) AS v(a, b, c)"  # noqa: S608 (placeholders only)


def parsed() -> tuple[int, int]:
    """(hits, misses) of the long-statement caches, both cursor kinds together."""
    infos = sqlcache.cache_info().values()
    return sum(i.hits for i in infos), sum(i.misses for i in infos)


def run(sql: str, params: list[int]) -> int:
    with connections["inventory"].cursor() as cursor:
        cursor.execute(sql, params)
        return cursor.fetchone()[0]


def test_the_cache_is_installed_for_both_cursor_kinds():
    from psycopg import _queries

    assert sqlcache.install()  # once per process: installed at start-up, a second call changes nothing
    assert set(sqlcache.cache_info()) == {"_query2pg_nocache", "_query2pg_client_nocache"}
    assert hasattr(_queries._query2pg_nocache, "cache_info")


def test_a_long_statement_is_parsed_once_and_runs_with_each_runs_values():
    sql = values_statement(40)  # 120 parameters: over psycopg's 50
    hits, misses = parsed()
    assert run(sql, list(range(120))) == sum(range(120))
    assert run(sql, [1] * 120) == 120  # the same text, other values: the values are this run's
    after_hits, after_misses = parsed()
    assert after_misses - misses == 1
    assert after_hits - hits == 1


def test_a_statement_too_long_for_the_cache_is_parsed_each_time(monkeypatch):
    monkeypatch.setattr(sqlcache, "LONG_STATEMENT_BYTES", 100)
    sql = values_statement(40)
    hits, misses = parsed()
    for _ in range(2):
        assert run(sql, [2] * 120) == 240
    assert parsed() == (hits, misses)
