from __future__ import annotations

from django.db.models import QuerySet, Sum

from .models import Reservation, StockItem

DB = "inventory"


def stock_list() -> QuerySet[StockItem]:
    return StockItem.objects.using(DB).all()


def stock_available() -> dict[str, int]:
    """SKU -> units available now (the read port other parts use, `ports.stock_available`)."""
    return {
        sku: on_hand - reserved for sku, on_hand, reserved in stock_list().values_list("sku", "on_hand", "reserved")
    }


def stock_get(*, sku: str) -> StockItem | None:
    return StockItem.objects.using(DB).filter(sku=sku).first()


def reservations_for_saga(*, saga_id) -> QuerySet[Reservation]:
    return Reservation.objects.using(DB).filter(saga_id=saga_id)


def lock_conflicts_by_sku() -> dict[str, int]:
    rows = Reservation.objects.using(DB).values("sku").annotate(conflicts=Sum("lock_conflicts"))
    return {row["sku"]: row["conflicts"] or 0 for row in rows}


def audit_stock() -> list[dict]:
    """Per SKU: the counters, and the held quantity the reservations account for."""
    held = dict(
        Reservation.objects.using(DB)
        .filter(state=Reservation.State.HELD)
        .values("sku")
        .annotate(total=Sum("quantity"))
        .values_list("sku", "total")
    )
    return [
        {"sku": i.sku, "on_hand": i.on_hand, "reserved": i.reserved, "held": held.get(i.sku, 0)}
        for i in StockItem.objects.using(DB).all()
    ]


def audit_reservations() -> dict[str, set[str]]:
    """Saga id -> the states of its reservations."""
    states: dict[str, set[str]] = {}
    for saga_id, state in Reservation.objects.using(DB).values_list("saga_id", "state"):
        states.setdefault(str(saga_id), set()).add(state)
    return states
