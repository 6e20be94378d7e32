"""psycopg's parse of long statements, cached.

Before sending a statement psycopg turns its `%s` placeholders into PostgreSQL's `$n`, by a
regular expression and a Python loop over the parts. It caches the result (an LRU of 128) only
for statements of at most 4,096 bytes and 50 parameters, on purpose: an ORM's multi-row
INSERT of varying length would only churn that cache (psycopg discussion 628). The engine's own
set-based statements are over that line (a saga's creation writes its ten steps with 180
parameters; a batch's write is one statement with every saga's, step's, event's and command's
values), and their shapes repeat: every lone order's creation, lock and writes are the same
texts. Parsed each time, the 180-parameter creation took 276 us here, and the parsing was 3.8 %
of a worker's CPU for orders run one at a time (py-spy, `make bench -c 1`).

`install()` gives those long statements an LRU of their own (`LONG_STATEMENTS` entries of at
most `LONG_STATEMENT_BYTES` each), so they neither pass through nor evict psycopg's cache of
the short ones. It replaces psycopg's `_query2pg_nocache` and `_query2pg_client_nocache` in
`psycopg._queries`, private names that `convert()` looks up at each call:
`tests/unit/kernel/test_sqlcache.py` fails if an upgrade stops them being used; review this
when psycopg is upgraded. If they are gone, `install()` logs a warning and changes nothing.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from typing import Any

logger = logging.getLogger(__name__)

LONG_STATEMENTS = 64
LONG_STATEMENT_BYTES = 32 * 1024
NAMES = ("_query2pg_nocache", "_query2pg_client_nocache")

_installed: set[str] = set()  # the names replaced in this process


def _cached(parse: Callable[[bytes, str], Any]) -> Callable[[bytes, str], Any]:
    remembered = functools.lru_cache(maxsize=LONG_STATEMENTS)(parse)

    @functools.wraps(parse)
    def parse_long(query: bytes, encoding: str) -> Any:
        # The results are shared between callers, as psycopg's own cache shares them: psycopg
        # reads them and never changes them.
        if len(query) <= LONG_STATEMENT_BYTES:
            return remembered(query, encoding)
        return parse(query, encoding)

    parse_long.cache_info = remembered.cache_info  # type: ignore[attr-defined]
    return parse_long


def install() -> bool:
    """Cache psycopg's parse of long statements, once per process. Returns whether it is on."""
    from psycopg import _queries

    if _installed:
        return True
    if not all(callable(getattr(_queries, name, None)) for name in NAMES):
        logger.warning("psycopg's statement parsers moved: long statements are parsed at every run")
        return False
    for name in NAMES:
        setattr(_queries, name, _cached(getattr(_queries, name)))
        _installed.add(name)
    return True


def cache_info() -> dict[str, Any]:
    """Each replaced parser's LRU statistics (hits, misses, size), by name."""
    from psycopg import _queries

    return {name: getattr(_queries, name).cache_info() for name in _installed}
