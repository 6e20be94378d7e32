"""Stock operations. Each runs inside the caller's transaction on the `inventory` alias."""

from __future__ import annotations

import logging
import random
import time
import uuid
from dataclasses import dataclass

from django.conf import settings
from django.db import transaction
from django.db.models import F

from sagaplatform.kernel import barrier
from sagaplatform.observability import hooks as observability

from . import contention
from .exceptions import InsufficientStock, StockContention, UnknownSku
from .models import Reservation, StockItem

logger = logging.getLogger(__name__)

DB = "inventory"


@dataclass(frozen=True)
class ReservedLine:
    sku: str
    quantity: int
    version: int
    lock_conflicts: int


def _backoff(attempt: int) -> None:
    # Full jitter, capped: contenders spread out instead of colliding again in lockstep.
    time.sleep(random.uniform(0, min(0.05, 0.001 * 2**attempt)))


def stock_reserve_line(*, sku: str, quantity: int) -> ReservedLine:
    """Move `quantity` units of `sku` from available to reserved, or raise.

    One conditional UPDATE: it only matches if nobody changed the row since we read it (version)
    and enough units are free, so two orders can never both take the last unit. On a version
    conflict, read again and retry with jitter, a bounded number of times.
    """
    conflicts = 0
    for attempt in range(settings.INVENTORY_MAX_LOCK_ATTEMPTS):
        item = StockItem.objects.using(DB).filter(sku=sku).values("id", "on_hand", "reserved", "version").first()
        if item is None:
            raise UnknownSku(f"Unknown SKU {sku!r}", details={"sku": sku})
        if item["on_hand"] - item["reserved"] < quantity:
            raise InsufficientStock(
                f"Only {item['on_hand'] - item['reserved']} of {sku} available, {quantity} requested",
                details={"sku": sku, "requested": quantity, "available": item["on_hand"] - item["reserved"]},
            )
        updated = (
            StockItem.objects.using(DB)
            .filter(id=item["id"], version=item["version"], on_hand__gte=F("reserved") + quantity)
            .update(reserved=F("reserved") + quantity, version=F("version") + 1)
        )
        if updated == 1:
            contention.record(sku=sku, conflicts=conflicts, reserved=True)
            return ReservedLine(sku=sku, quantity=quantity, version=item["version"] + 1, lock_conflicts=conflicts)
        conflicts += 1
        observability.lock_conflict(DB, retried=attempt + 1 < settings.INVENTORY_MAX_LOCK_ATTEMPTS)
        logger.debug("version conflict on %s (attempt %d)", sku, attempt + 1)
        _backoff(attempt)
    observability.lock_exhausted(DB)
    contention.record(sku=sku, conflicts=conflicts, exhausted=True)
    raise StockContention(f"{sku} is too contended right now", details={"sku": sku, "conflicts": conflicts})


def reservation_reserve(*, saga_id: uuid.UUID, order_id: uuid.UUID, lines: list[dict]) -> list[ReservedLine]:
    """Reserve every line of an order, or none of them.

    SKUs are taken in a fixed (sorted) order so two multi-line orders never wait on each other
    in opposite orders.
    """
    reserved = []
    with barrier.atomic(DB):
        for line in sorted(lines, key=lambda line: line["sku"]):
            got = stock_reserve_line(sku=line["sku"], quantity=int(line["quantity"]))
            Reservation.objects.using(DB).create(
                saga_id=saga_id,
                order_id=order_id,
                sku=got.sku,
                quantity=got.quantity,
                lock_conflicts=got.lock_conflicts,
            )
            reserved.append(got)
    return reserved


def _settle(*, saga_id: uuid.UUID, to_state: str, on_hand_delta: bool) -> int:
    settled = 0
    with barrier.atomic(DB):
        held = Reservation.objects.using(DB).filter(saga_id=saga_id, state=Reservation.State.HELD).order_by("sku")
        for reservation in held:
            # Conditional on the state, so a reservation is settled once even if asked twice.
            if not (
                Reservation.objects.using(DB)
                .filter(id=reservation.id, state=Reservation.State.HELD)
                .update(state=to_state)
            ):
                continue
            changes = {"reserved": F("reserved") - reservation.quantity, "version": F("version") + 1}
            if on_hand_delta:
                changes["on_hand"] = F("on_hand") - reservation.quantity
            StockItem.objects.using(DB).filter(sku=reservation.sku).update(**changes)
            settled += 1
    return settled


def reservation_release(*, saga_id: uuid.UUID) -> int:
    """Give a saga's held units back to the available pool (the compensation of reserve)."""
    return _settle(saga_id=saga_id, to_state=Reservation.State.RELEASED, on_hand_delta=False)


def reservation_commit(*, saga_id: uuid.UUID) -> int:
    """The goods leave the warehouse: held units leave `on_hand` for good."""
    return _settle(saga_id=saga_id, to_state=Reservation.State.COMMITTED, on_hand_delta=True)


def stock_set(*, sku: str, on_hand: int) -> StockItem:
    """Create or restock a SKU (demo data, admin). Bumps the version like every other write."""
    with transaction.atomic(using=DB):
        item, created = StockItem.objects.using(DB).get_or_create(sku=sku, defaults={"on_hand": on_hand})
        if not created:
            StockItem.objects.using(DB).filter(id=item.id).update(on_hand=on_hand, version=F("version") + 1)
            item.refresh_from_db(using=DB)
    return item


def stock_adjust(*, sku: str, on_hand: int, expected_version: int) -> StockItem:
    """Set `on_hand` as an operator saw the row at `expected_version` (the admin's stock form).

    One conditional UPDATE: it matches only if nobody (a saga's reservation, another operator)
    changed the row since it was read, and only if the units reserved for orders in flight still
    fit. A read before the write would race; the read after a refusal only says why.
    """
    with transaction.atomic(using=DB):
        updated = (
            StockItem.objects.using(DB)
            .filter(sku=sku, version=expected_version, reserved__lte=on_hand)
            .update(on_hand=on_hand, version=F("version") + 1)
        )
        item = StockItem.objects.using(DB).filter(sku=sku).first()
    if item is None:
        raise UnknownSku(f"Unknown SKU {sku!r}", details={"sku": sku})
    if updated:
        return item
    if item.version != expected_version:
        raise StockContention(
            f"{sku} changed since it was read (version {expected_version}, now {item.version})",
            code="stock_version_conflict",
            details={"sku": sku, "expected_version": expected_version, "version": item.version},
        )
    raise InsufficientStock(
        f"{item.reserved} units of {sku} are reserved for orders in flight; on hand cannot go below that",
        code="stock_below_reserved",
        details={"sku": sku, "on_hand": on_hand, "reserved": item.reserved},
    )
