"""The stock contention panel's numbers: what the inventory service records of its optimistic-lock
conflicts, fed by a real concurrent race on one SKU (PostgreSQL, Redis), and by a scripted rival
writer anywhere."""

from __future__ import annotations

import threading
import uuid
from concurrent.futures import ThreadPoolExecutor

import pytest
from django.db import connections
from django.db.models import F, Sum
from django.db.models.query import QuerySet

from inventory import contention, services
from inventory.exceptions import StockContention
from inventory.models import Reservation, StockItem
from inventory.services import reservation_reserve, stock_set
from orchestration import overview
from sagaplatform.kernel import commands

pytestmark = pytest.mark.django_db(databases="__all__")

DB = "inventory"


@pytest.fixture(autouse=True)
def _fresh_counts():
    contention.reset()
    yield
    contention.reset()


def reserve_command(*, saga_id, sku: str, quantity: int) -> dict:
    return commands.Command(
        saga_id=saga_id,
        step="reserve_stock",
        op="action",
        operation="reserve",
        attempt=1,
        payload={"order_id": str(uuid.uuid4()), "items": [{"sku": sku, "quantity": quantity}]},
    ).to_message()


@pytest.fixture
def rival(monkeypatch):
    """Another writer that bumps a stock row between our read and our conditional update, the
    next `times` times we read it (as in test_inventory.py)."""
    state = {"times": 0}
    real_first = QuerySet.first

    def first_then_rival_writes(self):
        row = real_first(self)
        if self.model is StockItem and self._fields and row is not None and state["times"] > 0:
            state["times"] -= 1
            StockItem.objects.using(DB).filter(id=row["id"]).update(version=F("version") + 1)
        return row

    monkeypatch.setattr(QuerySet, "first", first_then_rival_writes)
    monkeypatch.setattr(services, "_backoff", lambda attempt: None)
    return state


def run_at_once(count: int, fn) -> list[dict]:
    """`count` threads lined up on a barrier, each running `fn(i)` (an exception is returned)."""
    start = threading.Barrier(count, timeout=60)

    def worker(i: int) -> dict:
        try:
            start.wait()
            return fn(i)
        except Exception as exc:
            return {"status": "exception", "error": repr(exc)}
        finally:
            connections.close_all()

    with ThreadPoolExecutor(max_workers=count) as pool:
        return list(pool.map(worker, range(count)))


def totals(summary: dict) -> dict:
    return {f: sum(m[f] for m in summary["minutes"]) for f in contention.FIELDS}


def test_conflicts_retries_and_a_line_out_of_attempts_are_counted_per_sku(rival, settings):
    stock_set(sku="SKU-LAMP", on_hand=10)
    stock_set(sku="SKU-MUG", on_hand=10)
    rival["times"] = 2
    reservation_reserve(saga_id=uuid.uuid4(), order_id=uuid.uuid4(), lines=[{"sku": "SKU-LAMP", "quantity": 1}])
    settings.INVENTORY_MAX_LOCK_ATTEMPTS = 3
    rival["times"] = 3
    with pytest.raises(StockContention):
        commands.run(service=DB, message=reserve_command(saga_id=uuid.uuid4(), sku="SKU-MUG", quantity=1))
    reservation_reserve(saga_id=uuid.uuid4(), order_id=uuid.uuid4(), lines=[{"sku": "SKU-MUG", "quantity": 1}])

    summary = contention.summary()
    # The give-up was counted although its transaction rolled back.
    assert totals(summary) == {"conflicts": 5, "retries": 4, "exhausted": 1, "reservations": 2}
    assert summary["hottest"] == [
        {"sku": "SKU-MUG", "conflicts": 3, "retries": 2, "exhausted": 1, "reservations": 1},
        {"sku": "SKU-LAMP", "conflicts": 2, "retries": 2, "exhausted": 0, "reservations": 1},
    ]
    assert summary["conflicts_per_min"] == 1.0  # 5 over the last 5 minutes
    assert summary["exhausted_15m"] == 1
    assert len(summary["minutes"]) == contention.MINUTES


@pytest.mark.postgres
@pytest.mark.production
@pytest.mark.django_db(transaction=True, databases="__all__")
def test_a_real_race_on_one_sku_feeds_the_panel(settings):
    stock_set(sku="SKU-HOT", on_hand=100)
    stock_set(sku="SKU-COLD", on_hand=100)
    settings.INVENTORY_MAX_LOCK_ATTEMPTS = 3  # few attempts: some buyers run out of them
    results = run_at_once(
        40, lambda i: commands.run(service=DB, message=reserve_command(saga_id=uuid.uuid4(), sku="SKU-HOT", quantity=1))
    )
    commands.run(service=DB, message=reserve_command(saga_id=uuid.uuid4(), sku="SKU-COLD", quantity=1))

    won = [r for r in results if r.get("status") == "succeeded"]
    gave_up = [r for r in results if r.get("status") == "exception" and "StockContention" in r["error"]]
    assert len(won) + len(gave_up) == 40, results
    # What the winners' reservations say they met, and what the losers met (every attempt).
    won_conflicts = Reservation.objects.using(DB).filter(sku="SKU-HOT").aggregate(n=Sum("lock_conflicts"))["n"]
    expected = won_conflicts + 3 * len(gave_up)
    assert expected > 0, "forty buyers at once met no conflict"

    summary = overview.overview()["contention"]
    assert totals(summary) == {
        "conflicts": expected,
        "retries": expected - len(gave_up),
        "exhausted": len(gave_up),
        "reservations": len(won) + 1,
    }
    assert summary["hottest"][0] == {
        "sku": "SKU-HOT",
        "conflicts": expected,
        "retries": expected - len(gave_up),
        "exhausted": len(gave_up),
        "reservations": len(won),
    }
    assert "SKU-COLD" not in [s["sku"] for s in summary["hottest"]]  # no conflict: not hot
