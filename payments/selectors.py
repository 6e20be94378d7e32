from __future__ import annotations

from decimal import Decimal

from django.db.models import Sum

from . import gateway
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


# Local states in which the gateway took (or held) the money, and in which it also refunded it.
TAKEN_STATES = ("captured", "authorized", "voided", "refunded")


def gateway_mismatches(*, saga_ids) -> dict[str, str]:
    """Saga id -> how the gateway's records disagree with the local charge: every charge the
    gateway took is recorded here, every one recorded here was taken there, and a refund is in
    both or in neither. Empty when the gateway's records are not shared (`gateway.shares_records`)."""
    if not gateway.shares_records():
        return {}
    local = {str(c.saga_id): c for c in Charge.objects.using(DB).all()}
    keys = {
        saga_id: (local[saga_id].idempotency_key if saga_id in local else None) or f"{saga_id}:charge"
        for saga_id in set(map(str, saga_ids)) | set(local)
    }
    taken_by_key = gateway.find_charges(list(keys.values()))
    refunds = gateway.find_refunds([t.reference for t in taken_by_key.values()])
    found = {}
    for saga_id, key in sorted(keys.items()):
        charge, taken = local.get(saga_id), taken_by_key.get(key)
        refunded = refunds.get(taken.reference) if taken else None
        state = charge.state if charge else None
        if taken is not None and state not in TAKEN_STATES:
            found[saga_id] = f"the gateway took {taken.amount} ({taken.reference}); the local charge is {state}"
        elif taken is None and state in TAKEN_STATES:
            found[saga_id] = f"the local charge is {state}; the gateway took nothing"
        elif taken is not None and charge is not None and charge.gateway_reference != taken.reference:
            found[saga_id] = f"the local charge names {charge.gateway_reference}, the gateway {taken.reference}"
        elif (refunded is not None) != (state == "refunded"):
            found[saga_id] = f"the local charge is {state}; the gateway refund is {refunded}"
    return found
