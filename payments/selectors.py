from __future__ import annotations

from decimal import Decimal

from django.db.models import Sum

from .models import Charge, LedgerEntry

DB = "payments"


def charge_for_saga(*, saga_id) -> Charge | None:
    return Charge.objects.using(DB).filter(saga_id=saga_id).first()


def net_for_order(*, order_id) -> Decimal:
    total = LedgerEntry.objects.using(DB).filter(charge__order_id=order_id).aggregate(total=Sum("amount"))["total"]
    return total or Decimal("0.00")


def audit_charges() -> dict[str, dict]:
    """Saga id -> its charge: amount, state, and the ledger entries' kinds and sum."""
    charges = {}
    for charge in Charge.objects.using(DB).prefetch_related("entries"):
        entries = list(charge.entries.all())
        charges[str(charge.saga_id)] = {
            "amount": charge.amount,
            "state": charge.state,
            "entries": sorted(e.kind for e in entries),
            "net": sum((e.amount for e in entries), Decimal("0.00")),
        }
    return charges
