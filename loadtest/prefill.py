"""Pre-filled history for the benchmark (`manage.py bench --prefill N`): N finished sagas with
their steps, events, outbox and barrier rows, and the services' rows (order, lines, status
changes, reservation, charge, ledger, shipment, notification), written before the run.

The shapes are real: a few sagas are first run by the platform itself (`capture` takes their
rows in every database), then cloned N times by set-based SQL (`INSERT ... SELECT ... CROSS JOIN
generate_series`), one statement per template row set and table. Each clone gets its own ids:
every UUID of the template, in a UUID column or inside a text or JSON value, becomes a version 7
UUID of the clone's time with the random bits of `md5(uuid || salt || clone)` (`_clone_uuid`),
the same function in every database, so references across tables and databases still agree and
the keys are in time order as the platform's own (`kernel/ids.py`); the other unique tokens (a
payment method's `pm_...`, a gateway's `ch_...`, a tracking number) are replaced the same way.
Every timestamp is moved so the clones ended evenly spread between `max_age` and `min_age` ago,
and they are written oldest first. So the audit passes over the pre-filled data exactly as over
the templates (`tests/unit/ops/test_bench_tool.py`).

PostgreSQL only (the benchmark's database).
"""

from __future__ import annotations

import logging
import re
import secrets
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime, timedelta

from django.apps import apps
from django.conf import settings
from django.db import connections, models, transaction
from django.db.models import Q

logger = logging.getLogger(__name__)

# What a saga leaves behind, per database (the kernel's tables are in every database).
TABLES: tuple[tuple[str, str], ...] = (
    ("default", "orchestration.Saga"),
    ("default", "orchestration.SagaStep"),
    ("default", "orchestration.SagaEvent"),
    ("default", "kernel.OutboxMessage"),
    ("orders", "orders.Order"),
    ("orders", "orders.OrderLine"),
    ("orders", "orders.OrderStatusChange"),
    ("inventory", "inventory.Reservation"),
    ("payments", "payments.Charge"),
    ("payments", "payments.PaymentMethod"),
    ("payments", "payments.LedgerEntry"),
    ("shipping", "shipping.Shipment"),
    ("notifications", "notifications.Notification"),
    *((alias, "kernel.OutboxMessage") for alias in settings.SERVICE_ALIASES),
    *((alias, "kernel.Barrier") for alias in settings.SERVICE_ALIASES),
)

UUID_RE = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")
# Other unique tokens: a run of 16 to 32 hex digits (pm_..., ch_..., a tracking number).
HEX_RE = re.compile(r"(?<![0-9A-Za-z])(?:[a-z]{2}_)?([0-9a-f]{16,32}|[0-9A-F]{16,32})(?![0-9a-fA-F])")
HEX_IN_TRACKING = re.compile(r"(?<=SP)[0-9A-F]{16}\b")
TEXT_TYPES = {"CharField", "TextField", "SlugField", "EmailField"}
UUID_TYPES = {"UUIDField"}
AUTO_TYPES = {"AutoField", "BigAutoField", "SmallAutoField"}


@dataclass
class Template:
    """One finished saga's rows in every database, and the tokens that make them its own."""

    saga_id: str
    ended_at: datetime
    rows: dict[tuple[str, str], list] = field(default_factory=dict)  # (alias, model) -> pks
    # (alias, model, column) -> the tokens its template values hold: (text, kind) with kind
    # "uuid" or "hex".
    tokens: dict[tuple[str, str, str], list[tuple[str, str]]] = field(default_factory=dict)


def _model(label: str) -> type[models.Model]:
    return apps.get_model(label)


def _field_type(f: models.Field) -> str:
    if isinstance(f, models.ForeignKey):
        return _field_type(f.target_field)
    return f.get_internal_type()


def _tokens_in(text: str, excluded: set[str]) -> set[tuple[str, str]]:
    found = {(u, "uuid") for u in UUID_RE.findall(text)}
    found |= {(h, "hex") for h in HEX_RE.findall(text) if h not in excluded}
    found |= {(h, "hex") for h in HEX_IN_TRACKING.findall(text) if h not in excluded}
    return found


def capture(saga_ids: Iterable[str]) -> list[Template]:
    """The rows of each of these (finished) sagas in every database: every row of `TABLES` that
    names the saga, or names what a row of it names (its order, charge, notification, message)."""
    from orchestration.models import DefinitionSnapshot, Saga

    excluded = set(DefinitionSnapshot.objects.values_list("digest", flat=True))
    templates = []
    for saga in Saga.objects.filter(id__in=list(saga_ids)):
        if not saga.is_terminal or saga.finished_at is None:
            raise ValueError(f"saga {saga.id} has not finished: only finished sagas can be cloned")
        template = Template(saga_id=str(saga.id), ended_at=saga.finished_at)
        known: set[str] = {str(saga.id)}
        while True:
            grown = set(known)
            for alias, label in TABLES:
                model = _model(label)
                rows = model._default_manager.using(alias).filter(_names(model, sorted(known)))
                template.rows[(alias, label)] = list(rows.values_list("pk", flat=True))
                for row in rows.values():
                    grown |= {u for u, kind in _tokens_in(_json(row), excluded) if kind == "uuid"}
            if grown == known:
                break
            known = grown
        for alias, label in TABLES:
            model = _model(label)
            pks = template.rows[(alias, label)]
            if not pks:
                continue
            for f in model._meta.concrete_fields:
                kind = _field_type(f)
                if kind not in TEXT_TYPES and kind != "JSONField":
                    continue
                values = model._default_manager.using(alias).filter(pk__in=pks).values_list(f.attname, flat=True)
                found_tokens: set[tuple[str, str]] = set()
                for value in values:
                    if value is not None:
                        found_tokens |= _tokens_in(str(value) if kind != "JSONField" else _json(value), excluded)
                if found_tokens:
                    # Longest first: a token inside another (a hex run in a longer one) waits.
                    template.tokens[(alias, label, str(f.column))] = sorted(found_tokens, key=lambda t: -len(t[0]))
        templates.append(template)
    return templates


def _json(value) -> str:
    import json

    return json.dumps(value, default=str)


def _names(model: type[models.Model], ids: list[str]) -> Q:
    """Rows of `model` that name one of `ids`: in a UUID column, or (an outbox message) as the
    saga or the notification its payload is about."""
    match = Q(pk__in=[]) if _field_type(model._meta.pk) != "UUIDField" else Q(pk__in=ids)
    for f in model._meta.concrete_fields:
        if _field_type(f) in UUID_TYPES and not f.primary_key:
            match |= Q(**{f"{f.attname}__in": ids})
    if model._meta.label == "kernel.OutboxMessage":
        match |= Q(payload__saga_id__in=ids) | Q(payload__notification_id__in=ids)
    return match


def _clone_uuid(seed: str) -> str:
    """SQL for the clone's UUID: version 7, its time the clone's (`%(origin)s` plus `g`'s share of
    the span, in milliseconds), its random bits those of `md5(seed)`."""
    digest = f"md5({seed})"
    millis = "(extract(epoch FROM %(origin)s + make_interval(secs => %(step)s * (g - %(base)s))) * 1000)::bigint"
    variant = f"substr('89ab', get_byte(decode(substr({digest}, 17, 2), 'hex'), 0) %% 4 + 1, 1)"
    return (
        f"(lpad(to_hex({millis}), 12, '0') || '7' || substr({digest}, 14, 3) || {variant} "
        f"|| substr({digest}, 18, 15))::uuid"
    )


def _new_token(token: str, kind: str, salt: str) -> str:
    """SQL for the clone's token (the clone number is `g`)."""
    if kind == "uuid":
        seed = f"'{token}' || '{salt}' || g"
        return f"{_clone_uuid(seed)}::text"
    sql = f"substr(md5('{token}' || '{salt}' || g), 1, {len(token)})"
    return f"upper({sql})" if token.isupper() else sql


def _insert_sql(template: Template, alias: str, label: str, salt: str) -> tuple[str, str]:
    model = _model(label)
    qn = connections[alias].ops.quote_name
    columns, exprs = [], []
    for f in model._meta.concrete_fields:
        kind = _field_type(f)
        column = qn(str(f.column))
        if kind in AUTO_TYPES:
            continue
        value = f"t.{column}"
        if kind in UUID_TYPES:
            value = _clone_uuid(f"t.{column}::text || '{salt}' || g")
        elif kind in TEXT_TYPES or kind == "JSONField":
            text = f"t.{column}::text" if kind == "JSONField" else value
            for token, token_kind in template.tokens.get((alias, label, str(f.column)), ()):
                text = f"replace({text}, '{token}', {_new_token(token, token_kind, salt)})"
            value = f"({text})::jsonb" if kind == "JSONField" else text
        elif kind == "DateTimeField":
            value = f"t.{column} + %(shift)s + make_interval(secs => %(step)s * (g - %(base)s))"
        columns.append(column)
        exprs.append(value)
    table = qn(model._meta.db_table)
    pk = qn(str(model._meta.pk.column))
    sql = (
        f"INSERT INTO {table} ({', '.join(columns)}) "  # noqa: S608 (our own identifiers and tokens)
        f"SELECT {', '.join(exprs)} FROM {table} t CROSS JOIN generate_series(%(first)s::int, %(last)s::int) AS g "
        f"WHERE t.{pk} = ANY(%(pks)s) ORDER BY g, t.{pk}"
    )
    return table, sql


def prefill(
    templates: list[Template],
    n: int,
    *,
    min_age: timedelta = timedelta(hours=3),
    max_age: timedelta = timedelta(days=30),
    chunk: int = 5000,
    slices: int = 20,
    out=None,
) -> dict:
    """Write `n` clones of `templates` (round robin), ended evenly between `max_age` and
    `min_age` ago. Returns the rows written per database and table, and the seconds it took.

    The rows go in oldest first, as a platform that ran for that long would have appended them:
    the time is cut in `slices`, and each slice's clones of every template are written before
    the next slice's, each statement's in time order. An index that relies on it (the
    timeline's BRIN, `saga_event_created_brin`) then skips the history as it would in
    production; written in random time order, the planner would scan the whole table instead."""
    if not templates:
        raise ValueError("no template saga to clone")
    if connections["default"].vendor != "postgresql":
        raise RuntimeError("the pre-fill writes with PostgreSQL's SQL: run it on PostgreSQL")
    started = time.monotonic()
    salt = f":{secrets.token_hex(6)}:"
    with connections["default"].cursor() as cursor:
        cursor.execute("SELECT now()")
        anchor = cursor.fetchone()[0]
    span = (max_age - min_age).total_seconds()
    plans = []
    for index, template in enumerate(templates):
        clones = n // len(templates) + (index < n % len(templates))
        if clones:
            plans.append((template, clones, index * (n // len(templates) + 1)))  # clone numbers never repeat
    written: dict[str, int] = {}
    aliases = list(dict.fromkeys(alias for alias, _ in TABLES))
    statements = {
        (index, alias, label): _insert_sql(template, alias, label, salt)
        for index, (template, _, _) in enumerate(plans)
        for alias, label in TABLES
        if template.rows.get((alias, label))
    }
    for part in range(slices):
        for alias in aliases:  # each database's share of the slice in one transaction
            with transaction.atomic(using=alias), connections[alias].cursor() as cursor:
                for index, (template, clones, base) in enumerate(plans):
                    # Clone j ended max_age ago plus j steps: the last one just before min_age.
                    first, end = clones * part // slices, clones * (part + 1) // slices
                    params = {
                        "shift": (anchor - max_age) - template.ended_at,
                        "origin": anchor - max_age,
                        "step": span / clones,
                        "base": base,
                    }
                    for table_alias, label in TABLES:
                        if table_alias != alias or (index, alias, label) not in statements:
                            continue
                        table, sql = statements[(index, alias, label)]
                        pks = template.rows[(alias, label)]
                        for low in range(first, end, chunk):
                            high = min(end, low + chunk) - 1
                            cursor.execute(sql, {**params, "first": base + low, "last": base + high, "pks": pks})
                            key = f"{alias}.{table.strip(chr(34))}"
                            written[key] = written.get(key, 0) + cursor.rowcount
        if out is not None and (part + 1) % 5 == 0:
            out.write(f"  pre-fill: {part + 1}/{slices} of the time written\n")
    # What autovacuum would have done to a history this old: statistics for the planner, and
    # the BRIN index of the timeline summarized (saga_event_created_brin).
    for alias in {alias for alias, _ in TABLES}:
        with connections[alias].cursor() as cursor:
            for table in {_model(label)._meta.db_table for a, label in TABLES if a == alias}:
                cursor.execute(f"VACUUM (ANALYZE) {connections[alias].ops.quote_name(table)}")
    # A history written over weeks is on disk by now, not in the buffers for the next checkpoint
    # to write while the benchmark runs (one checkpoint serves the whole cluster).
    with connections["default"].cursor() as cursor:
        cursor.execute("CHECKPOINT")
    return {"sagas": n, "rows": written, "seconds": round(time.monotonic() - started, 1)}
