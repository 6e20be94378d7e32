"""Hand-written multi-row statements for the hot path (PostgreSQL).

The ORM's `create` and `bulk_create` compile their INSERT anew on every call, and preparing
each value costs more than the values themselves (profiled in a worker under `make bench`). Here
a model's row template, `(%s::type, ...)`, is built once per model and database vendor, and every
value is prepared as Django saves it (`pre_save`, `get_db_prep_save`). Only the model's own
quoted names are interpolated; every value is a parameter.

A field with a database default (`db_default`) takes it where the object has no value of its
own: `COALESCE(%s, <default>)`, so every row keeps the same shape (one prepared statement).
"""

from __future__ import annotations

from typing import Any

from django.db.models import NOT_PROVIDED
from django.db.models.expressions import DatabaseDefault
from django.db.models.sql import Query

# (model, fixed fields, vendor) -> the written fields and a row's `(%s::type, ...)`.
_LAYOUTS: dict[tuple[Any, frozenset[str], str], tuple[list[Any], str]] = {}


def layout(model: Any, fixed: frozenset[str], connection: Any) -> tuple[list[Any], str]:
    """`model`'s columns other than `fixed`, and the template of one row of their values."""
    key = (model, fixed, connection.vendor)
    found = _LAYOUTS.get(key)
    if found is None:
        fields = [f for f in model._meta.concrete_fields if f.name not in fixed and f.column]
        found = _LAYOUTS[key] = (fields, "(" + ", ".join(_placeholder(model, f, connection) for f in fields) + ")")
    return found


def _placeholder(model: Any, field: Any, connection: Any) -> str:
    cast = f"%s::{field.db_type(connection)}"
    if field.db_default is NOT_PROVIDED:
        return cast
    default, params = Query(model).get_compiler(connection=connection).compile(field.db_default)
    if params:  # a default with parameters of its own would shift every row's values
        raise ValueError(f"{model.__name__}.{field.name}: a database default with parameters")
    return f"COALESCE({cast}, {default})"


def values(fields: list[Any], obj: Any, connection: Any, *, add: bool) -> list[Any]:
    """`obj`'s values of `fields`, as Django saves them (None where the database's default
    applies)."""
    row = []
    for field in fields:
        value = field.pre_save(obj, add)
        row.append(None if isinstance(value, DatabaseDefault) else field.get_db_prep_save(value, connection))
    return row


def insert(
    model: Any, objects: list[Any], connection: Any, *, fixed: frozenset[str] = frozenset()
) -> tuple[str, list[Any]]:
    """One `INSERT ... VALUES` of `objects` (and its parameters), every column but `fixed`."""
    fields, row = layout(model, fixed, connection)
    quote = connection.ops.quote_name
    params: list[Any] = []
    for obj in objects:
        params.extend(values(fields, obj, connection, add=True))
    sql = (
        f"INSERT INTO {quote(model._meta.db_table)} ({', '.join(quote(str(f.column)) for f in fields)}) "  # noqa: S608
        f"VALUES {', '.join([row] * len(objects))}"
    )
    return sql, params
