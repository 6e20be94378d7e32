"""Primary keys in time order: UUID version 7 (RFC 9562).

A version 7 UUID starts with its creation time in milliseconds and keeps 74 random bits after
it, so it is as hard to guess as the version 4 it replaces, but the keys a database receives
are almost in order. A B-tree over random keys takes each insert on a random leaf page: the
pages a service touches grow with everything it ever stored, and past the buffer cache every
insert reads a page and writes it whole to the WAL after each checkpoint. Over time-ordered keys
the inserts land on the rightmost pages, whatever the table's size. The indexes that lead with a
saga's id (its steps, its events, each service's barrier and records) gain the same.

`uuid_utils.compat` returns the standard library's `uuid.UUID`, which Django's `UUIDField` expects.
"""

from __future__ import annotations

import uuid

from uuid_utils import compat


def new_id() -> uuid.UUID:
    """A new key: time-ordered (version 7), 74 random bits."""
    return compat.uuid7()
