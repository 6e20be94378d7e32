"""Stock arithmetic, optimistic locking and the reservation lifecycle of the inventory service."""

from __future__ import annotations

import threading
import uuid
from concurrent.futures import ThreadPoolExecutor

import pytest
from django.db import IntegrityError, connections, transaction
from django.db.models import F
from django.db.models.query import QuerySet

from inventory import selectors, services
from inventory.exceptions import InsufficientStock, StockContention, UnknownSku
from inventory.models import Reservation, StockItem
from inventory.services import reservation_commit, reservation_release, reservation_reserve, stock_set
from sagaplatform.kernel import commands
from sagaplatform.kernel.models import Barrier

pytestmark = pytest.mark.django_db(databases="__all__")

DB = "inventory"


def stock(sku: str) -> tuple[int, int, int]:
    item = StockItem.objects.using(DB).get(sku=sku)
    return item.on_hand, item.reserved, item.version


def everything() -> dict:
    return {
        "stock": sorted(StockItem.objects.using(DB).values_list("sku", "on_hand", "reserved", "version")),
        "reservations": sorted(Reservation.objects.using(DB).values_list("saga_id", "sku", "quantity", "state")),
    }


def reserve(*lines: tuple[str, int], saga_id=None, order_id=None):
    return reservation_reserve(
        saga_id=saga_id or uuid.uuid4(),
        order_id=order_id or uuid.uuid4(),
        lines=[{"sku": sku, "quantity": quantity} for sku, quantity in lines],
    )


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
def lamp():
    """Ten lamps, nothing reserved, version 0."""
    stock_set(sku="SKU-LAMP", on_hand=10)
    return "SKU-LAMP"


@pytest.fixture
def shelf():
    for sku, on_hand in (("SKU-A", 10), ("SKU-B", 5), ("SKU-C", 1)):
        stock_set(sku=sku, on_hand=on_hand)


# --- stock_set ---------------------------------------------------------------------------------


def test_a_new_sku_starts_at_version_zero_and_a_restock_bumps_it(lamp):
    assert stock(lamp) == (10, 0, 0)
    reserve((lamp, 4))

    stock_set(sku=lamp, on_hand=25)

    assert stock(lamp) == (25, 4, 2)  # reserved units survive a restock


def test_a_restock_below_what_is_reserved_is_refused(lamp):
    reserve((lamp, 6))

    with pytest.raises(IntegrityError), transaction.atomic(using=DB):
        stock_set(sku=lamp, on_hand=5)

    assert stock(lamp) == (10, 6, 1)


# --- reserve -----------------------------------------------------------------------------------


def test_reserve_moves_units_from_available_to_reserved_and_bumps_the_version(lamp):
    saga_id, order_id = uuid.uuid4(), uuid.uuid4()

    [line] = reserve((lamp, 3), saga_id=saga_id, order_id=order_id)

    assert (line.sku, line.quantity, line.version, line.lock_conflicts) == (lamp, 3, 1, 0)
    assert stock(lamp) == (10, 3, 1)
    assert StockItem.objects.using(DB).get(sku=lamp).available == 7
    reservation = Reservation.objects.using(DB).get(saga_id=saga_id)
    assert (reservation.order_id, reservation.sku, reservation.quantity) == (order_id, lamp, 3)
    assert reservation.state == Reservation.State.HELD


def test_each_reservation_bumps_the_version_once(lamp):
    versions = [reserve((lamp, 1))[0].version for _ in range(4)]

    assert versions == [1, 2, 3, 4]
    assert stock(lamp) == (10, 4, 4)


def test_reserving_exactly_what_is_available_succeeds_and_one_more_fails(lamp):
    reserve((lamp, 7))
    reserve((lamp, 3))
    before = everything()

    with pytest.raises(InsufficientStock) as refused:
        reserve((lamp, 1))

    assert refused.value.code == "insufficient_stock"
    assert refused.value.details == {"sku": lamp, "requested": 1, "available": 0}
    assert everything() == before
    assert stock(lamp) == (10, 10, 2)


def test_reserved_units_are_invisible_to_other_orders(lamp):
    reserve((lamp, 8))

    with pytest.raises(InsufficientStock) as refused:
        reserve((lamp, 3))

    assert refused.value.details["available"] == 2
    assert stock(lamp) == (10, 8, 1)


def test_an_unknown_sku_is_a_business_failure_and_changes_nothing(lamp):
    before = everything()

    with pytest.raises(UnknownSku) as refused:
        reserve(("SKU-GHOST", 1))

    assert refused.value.code == "unknown_sku"
    assert refused.value.details == {"sku": "SKU-GHOST"}
    assert everything() == before


def test_a_multi_line_order_reserves_every_line_in_sku_order(shelf):
    saga_id = uuid.uuid4()

    lines = reserve(("SKU-C", 1), ("SKU-A", 2), ("SKU-B", 5), saga_id=saga_id)

    assert [(line.sku, line.quantity) for line in lines] == [("SKU-A", 2), ("SKU-B", 5), ("SKU-C", 1)]
    assert [stock(sku) for sku in ("SKU-A", "SKU-B", "SKU-C")] == [(10, 2, 1), (5, 5, 1), (1, 1, 1)]
    assert sorted(Reservation.objects.using(DB).filter(saga_id=saga_id).values_list("sku", "quantity")) == [
        ("SKU-A", 2),
        ("SKU-B", 5),
        ("SKU-C", 1),
    ]


@pytest.mark.parametrize(
    ("lines", "error"),
    [
        ((("SKU-C", 2), ("SKU-A", 3), ("SKU-B", 1)), InsufficientStock),  # the last SKU in order fails
        ((("SKU-A", 3), ("SKU-B", 6)), InsufficientStock),  # the second fails
        ((("SKU-A", 3), ("SKU-B", 1), ("SKU-Z", 1)), UnknownSku),
    ],
)
def test_a_multi_line_order_is_all_or_nothing(shelf, lines, error):
    before = everything()

    with pytest.raises(error):
        reserve(*lines)

    assert everything() == before
    assert stock("SKU-A") == (10, 0, 0)
    assert not Reservation.objects.using(DB).exists()


def test_the_reserve_operation_answers_with_the_lines_and_their_versions(shelf):
    saga_id = uuid.uuid4()
    message = reserve_command(saga_id=saga_id, sku="SKU-B", quantity=2)
    message["payload"]["items"] = [{"sku": "SKU-B", "quantity": 2}, {"sku": "SKU-A", "quantity": 1}]

    outcome = commands.run(service=DB, message=message)

    assert outcome == {
        "status": "succeeded",
        "result": {
            "reserved": [{"sku": "SKU-A", "quantity": 1, "version": 1}, {"sku": "SKU-B", "quantity": 2, "version": 1}]
        },
    }


# --- version conflicts -------------------------------------------------------------------------


@pytest.fixture
def rival(monkeypatch):
    """Another writer that takes one unit between our read of a stock row and our conditional
    update, the next `times` times we read it: exactly the race the version column guards.

    The rival writes on our connection, so when our transaction rolls back its units go too;
    the threaded PostgreSQL tests below race real transactions."""
    state = {"times": 0, "backoffs": 0}
    real_first = QuerySet.first

    def first_then_rival_writes(self):
        row = real_first(self)
        if self.model is StockItem and self._fields and row is not None and state["times"] > 0:
            state["times"] -= 1
            StockItem.objects.using(DB).filter(id=row["id"]).update(
                reserved=F("reserved") + 1, version=F("version") + 1
            )
        return row

    def no_sleep(attempt: int) -> None:
        state["backoffs"] += 1

    monkeypatch.setattr(QuerySet, "first", first_then_rival_writes)
    monkeypatch.setattr(services, "_backoff", no_sleep)
    return state


def test_a_version_conflict_is_retried_and_counted(lamp, rival):
    rival["times"] = 2
    saga_id = uuid.uuid4()

    [line] = reserve((lamp, 3), saga_id=saga_id)

    assert (line.version, line.lock_conflicts) == (3, 2)
    assert stock(lamp) == (10, 2 + 3, 3)  # the rival's two units and our three, no lost update
    assert rival["backoffs"] == 2
    assert Reservation.objects.using(DB).get(saga_id=saga_id).lock_conflicts == 2
    assert selectors.lock_conflicts_by_sku() == {lamp: 2}


def test_a_retry_checks_availability_again(lamp, rival):
    """We saw 3 free units; the rival took one before our update: 3 no longer fit."""
    reserve((lamp, 7))
    rival["times"] = 1

    with pytest.raises(InsufficientStock) as refused:
        reserve((lamp, 3))

    assert refused.value.details["available"] == 2
    assert stock(lamp) == (10, 7, 1)  # the rival rolled back with us; we took nothing
    assert Reservation.objects.using(DB).count() == 1


def test_too_much_contention_is_a_transient_error_with_nothing_reserved(lamp, rival, settings):
    settings.INVENTORY_MAX_LOCK_ATTEMPTS = 3
    rival["times"] = 3
    saga_id = uuid.uuid4()

    with pytest.raises(StockContention) as gave_up:
        commands.run(service=DB, message=reserve_command(saga_id=saga_id, sku=lamp, quantity=1))

    assert gave_up.value.code == "stock_contention"
    assert gave_up.value.details == {"sku": lamp, "conflicts": 3}
    assert stock(lamp) == (10, 0, 0)  # the rival rolled back with us; we took nothing
    assert not Reservation.objects.using(DB).exists()
    assert not Barrier.objects.using(DB).exists()  # transient: the next attempt runs for real


# --- release and commit ------------------------------------------------------------------------


def test_release_gives_the_units_back_once(lamp):
    saga_id = uuid.uuid4()
    reserve((lamp, 4), saga_id=saga_id)

    assert reservation_release(saga_id=saga_id) == 1
    assert stock(lamp) == (10, 0, 2)
    assert reservation_release(saga_id=saga_id) == 0
    assert stock(lamp) == (10, 0, 2)
    assert Reservation.objects.using(DB).get(saga_id=saga_id).state == Reservation.State.RELEASED


def test_commit_takes_the_units_out_of_stock_once(lamp):
    saga_id = uuid.uuid4()
    reserve((lamp, 4), saga_id=saga_id)

    assert reservation_commit(saga_id=saga_id) == 1
    assert stock(lamp) == (6, 0, 2)
    assert reservation_commit(saga_id=saga_id) == 0
    assert stock(lamp) == (6, 0, 2)
    assert Reservation.objects.using(DB).get(saga_id=saga_id).state == Reservation.State.COMMITTED


def test_a_committed_reservation_cannot_be_released_nor_a_released_one_committed(lamp):
    committed, released = uuid.uuid4(), uuid.uuid4()
    reserve((lamp, 2), saga_id=committed)
    reserve((lamp, 3), saga_id=released)
    reservation_commit(saga_id=committed)
    reservation_release(saga_id=released)
    before = everything()

    assert reservation_release(saga_id=committed) == 0
    assert reservation_commit(saga_id=released) == 0
    assert everything() == before
    assert stock(lamp) == (8, 0, 4)


def test_release_and_commit_touch_only_their_own_saga(shelf):
    mine, theirs = uuid.uuid4(), uuid.uuid4()
    reserve(("SKU-A", 2), ("SKU-B", 1), saga_id=mine)
    reserve(("SKU-A", 3), saga_id=theirs)

    assert reservation_release(saga_id=mine) == 2

    assert stock("SKU-A") == (10, 3, 3)
    assert stock("SKU-B") == (5, 0, 2)
    assert Reservation.objects.using(DB).get(saga_id=theirs).state == Reservation.State.HELD


def test_releasing_a_saga_with_no_reservation_changes_nothing(lamp):
    before = everything()

    assert reservation_release(saga_id=uuid.uuid4()) == 0
    assert reservation_commit(saga_id=uuid.uuid4()) == 0
    assert everything() == before


# --- real concurrency (PostgreSQL) -------------------------------------------------------------


def run_at_once(count: int, fn) -> list[dict]:
    """Line `count` threads up on a barrier, run `fn(i)` in each, close each thread's connections."""
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


@pytest.mark.postgres
@pytest.mark.django_db(transaction=True, databases="__all__")
def test_fifty_buyers_for_ten_lamps_never_oversell(lamp):
    results = run_at_once(
        50, lambda i: commands.run(service=DB, message=reserve_command(saga_id=uuid.uuid4(), sku=lamp, quantity=1))
    )

    succeeded = [r for r in results if r["status"] == "succeeded"]
    refused = [r for r in results if r["status"] == "business_failure"]
    assert len(succeeded) == 10, [r for r in results if r["status"] == "exception"]
    assert len(refused) == 40
    assert {r["error"]["code"] for r in refused} == {"insufficient_stock"}
    on_hand, reserved, version = stock(lamp)
    assert (on_hand, reserved, version) == (10, 10, 10)
    versions = sorted(r["result"]["reserved"][0]["version"] for r in succeeded)
    assert versions == list(range(1, 11))  # every success saw its own version: no lost update
    assert Reservation.objects.using(DB).count() == 10
    assert Reservation.objects.using(DB).filter(sku=lamp, state="held").count() == 10
    assert Barrier.objects.using(DB).count() == 50


@pytest.mark.postgres
@pytest.mark.django_db(transaction=True, databases="__all__")
def test_multi_line_orders_in_opposite_orders_do_not_deadlock(shelf):
    stock_set(sku="SKU-A", on_hand=100)
    stock_set(sku="SKU-B", on_hand=100)

    def order(i: int) -> dict:
        items = [{"sku": "SKU-A", "quantity": 1}, {"sku": "SKU-B", "quantity": 1}]
        message = reserve_command(saga_id=uuid.uuid4(), sku="SKU-A", quantity=1)
        message["payload"]["items"] = items if i % 2 else items[::-1]
        return commands.run(service=DB, message=message)

    results = run_at_once(20, order)

    assert [r["status"] for r in results] == ["succeeded"] * 20, results
    assert stock("SKU-A")[:2] == (100, 20)
    assert stock("SKU-B")[:2] == (100, 20)
    assert Reservation.objects.using(DB).count() == 40


@pytest.mark.postgres
@pytest.mark.django_db(transaction=True, databases="__all__")
def test_concurrent_releases_of_one_saga_release_it_once(lamp):
    """Without the barrier (two different steps, say): the conditional state update decides."""
    mine, theirs = uuid.uuid4(), uuid.uuid4()
    reserve((lamp, 4), saga_id=mine)
    reserve((lamp, 6), saga_id=theirs)

    results = run_at_once(8, lambda i: {"status": "done", "released": reservation_release(saga_id=mine)})

    assert [r["status"] for r in results] == ["done"] * 8, results
    assert sum(r["released"] for r in results) == 1
    assert stock(lamp) == (10, 6, 3)
    assert Reservation.objects.using(DB).get(saga_id=mine).state == Reservation.State.RELEASED
    assert Reservation.objects.using(DB).get(saga_id=theirs).state == Reservation.State.HELD
