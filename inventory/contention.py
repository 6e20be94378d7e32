"""Optimistic-lock contention on stock, as the inventory service meets it, per SKU and minute.

`stock_reserve_line` records every line it reserves or gives up on: the version conflicts it
met, the retries they caused, and whether it ran out of lock attempts (`StockContention`). The
counts go to Redis (the cache's server, shared by every worker) in one atomic script per line,
bucketed by the Redis server's clock, outside the reservation's transaction: a reservation that
gave up and rolled back is still counted. In the embedded mode (no Redis) they are kept in the
process's memory. `summary()` is what the dashboard shows (through `ports.stock_contention`).
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter, defaultdict
from datetime import UTC, datetime
from functools import cache
from typing import Any

from django.conf import settings

logger = logging.getLogger(__name__)

PREFIX = "contention:"
MINUTES = 15  # the panel's history
HOT_MINUTES = 5  # "now", for the hottest SKUs and the rate
FIELDS = ("conflicts", "retries", "exhausted", "reservations")

_RECORD = """
local minute = math.floor(tonumber(redis.call('TIME')[1]) / 60)
local key = KEYS[1] .. minute
for i = 1, #ARGV, 2 do redis.call('HINCRBY', key, ARGV[i], ARGV[i + 1]) end
redis.call('EXPIRE', key, 60 * 20)
return minute
"""
_READ = """
local minute = math.floor(tonumber(redis.call('TIME')[1]) / 60)
local out = {minute}
for m = minute - tonumber(ARGV[1]) + 1, minute do table.insert(out, redis.call('HGETALL', KEYS[1] .. m)) end
return out
"""


class _Memory:
    """The embedded mode's store: one process, its own clock."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.minutes: dict[int, Counter] = defaultdict(Counter)

    def record(self, fields: dict[str, int]) -> None:
        minute = int(time.time() // 60)
        with self.lock:
            self.minutes[minute].update(fields)
            for old in [m for m in self.minutes if m < minute - 20]:
                del self.minutes[old]

    def read(self, minutes: int) -> tuple[int, list[dict[str, int]]]:
        now = int(time.time() // 60)
        with self.lock:
            return now, [dict(self.minutes.get(m, {})) for m in range(now - minutes + 1, now + 1)]


@cache
def _store():
    config = settings.CACHES["default"]
    if not config["BACKEND"].endswith("RedisCache"):
        return _Memory()
    import redis

    # Short timeouts: a count is never worth holding up a reservation for.
    return redis.Redis.from_url(config["LOCATION"], socket_timeout=1, socket_connect_timeout=1)


def record(*, sku: str, conflicts: int, exhausted: bool = False, reserved: bool = False) -> None:
    """Count one line's attempt at reserving `sku` (never raises)."""
    fields = {
        f"{sku}|conflicts": conflicts,
        # Every conflict is retried, except the last one of a line that ran out of attempts.
        f"{sku}|retries": conflicts - 1 if exhausted else conflicts,
        f"{sku}|exhausted": int(exhausted),
        f"{sku}|reservations": int(reserved),
    }
    fields = {k: v for k, v in fields.items() if v}
    if not fields:
        return
    store = _store()
    try:
        if isinstance(store, _Memory):
            store.record(fields)
        else:
            store.eval(_RECORD, 1, PREFIX, *[x for pair in fields.items() for x in pair])
    except Exception:
        logger.warning("stock contention of %s not recorded", sku, exc_info=True)


def _read(minutes: int) -> tuple[int, list[dict[str, int]]]:
    store = _store()
    if isinstance(store, _Memory):
        return store.read(minutes)
    reply = store.eval(_READ, 1, PREFIX, minutes)
    buckets = []
    for flat in reply[1:]:
        pairs = [x.decode() if isinstance(x, bytes) else x for x in flat]
        buckets.append({pairs[i]: int(pairs[i + 1]) for i in range(0, len(pairs), 2)})
    return int(reply[0]), buckets


def summary(*, hottest: int = 5) -> dict:
    """Per minute (last 15): conflicts, retries, lines that ran out of attempts, reservations;
    the SKUs with the most conflicts over the last 5 minutes; the conflict rate over those."""
    try:
        now, buckets = _read(MINUTES)
    except Exception:
        logger.warning("stock contention not readable", exc_info=True)
        return {"available": False, "minutes": [], "hottest": [], "conflicts_per_min": None, "exhausted_15m": None}
    series: list[dict[str, Any]] = []
    per_sku: dict[str, Counter[str]] = defaultdict(Counter)
    for offset, bucket in enumerate(buckets):
        minute = now - MINUTES + 1 + offset
        totals: Counter[str] = Counter()
        for name, value in bucket.items():
            sku, _, field = name.rpartition("|")
            totals[field] += value
            if offset >= MINUTES - HOT_MINUTES:
                per_sku[sku][field] += value
        series.append({"t": datetime.fromtimestamp(minute * 60, UTC).isoformat(), **{f: totals[f] for f in FIELDS}})
    recent = series[-HOT_MINUTES:]
    ranked = sorted(
        (sku for sku, c in per_sku.items() if c["conflicts"] or c["exhausted"]),
        key=lambda sku: (-per_sku[sku]["conflicts"], -per_sku[sku]["exhausted"], sku),
    )
    return {
        "available": True,
        "minutes": series,
        "conflicts_per_min": round(sum(m["conflicts"] for m in recent) / HOT_MINUTES, 2),
        "retries_per_min": round(sum(m["retries"] for m in recent) / HOT_MINUTES, 2),
        "exhausted_15m": sum(m["exhausted"] for m in series),
        "hottest": [{"sku": sku, **{f: per_sku[sku][f] for f in FIELDS}} for sku in ranked[:hottest]],
    }


def reset() -> None:
    """Forget every count (tests)."""
    store = _store()
    if isinstance(store, _Memory):
        with store.lock:
            store.minutes.clear()
        return
    # SCAN walks the whole database, 10 keys a round trip unless told otherwise.
    keys = list(store.scan_iter(f"{PREFIX}*", count=1000))
    if keys:
        store.delete(*keys)
