from __future__ import annotations

from django.db.models import QuerySet, Sum

from .models import Reservation, StockItem

DB = "inventory"


def stock_list() -> QuerySet[StockItem]:
    return StockItem.objects.using(DB).all()


def stock_get(*, sku: str) -> StockItem | None:
    return StockItem.objects.using(DB).filter(sku=sku).first()


def reservations_for_saga(*, saga_id) -> QuerySet[Reservation]:
    return Reservation.objects.using(DB).filter(saga_id=saga_id)


def lock_conflicts_by_sku() -> dict[str, int]:
    rows = Reservation.objects.using(DB).values("sku").annotate(conflicts=Sum("lock_conflicts"))
    return {row["sku"]: row["conflicts"] or 0 for row in rows}
