"""Cross-service invariants, checked at rest (`manage.py audit`).

Reads every service's database through its selectors and the kernel's barrier and outbox
tables, and names every violation. It is the oracle of the simulations and chaos tests: a run
is only good if the audit finds nothing.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from decimal import Decimal

from django.conf import settings

from inventory import selectors as inventory
from orders import selectors as orders
from payments import selectors as payments
from sagaplatform.kernel import audit as kernel
from shipping import selectors as shipping

from .definitions import UnknownDefinitionVersion, for_saga
from .models import Saga, SagaStep

FAILED_OUTCOMES = (Saga.State.COMPENSATED, Saga.State.FAILED, Saga.State.CANCELLED)
UNDONE = (SagaStep.State.PENDING, SagaStep.State.COMPENSATED, SagaStep.State.SKIPPED)


@dataclass(frozen=True)
class Violation:
    rule: str
    subject: str
    detail: str

    def __str__(self) -> str:
        return f"{self.rule}: {self.subject}: {self.detail}"


def run_audit(*, gateway: bool = False) -> list[Violation]:
    """Every violation found. `gateway`: also compare the payment gateway's own records with the
    charges (`gateway_mismatch`); only where this process reads the records the workers wrote (the
    fake gateway keeps them in the cache: a Redis restarted or another Redis since loses them)."""
    found: list[Violation] = []
    sagas = {str(s.id): s for s in Saga.objects.all()}
    steps: dict[str, dict[str, SagaStep]] = defaultdict(dict)
    for action_step in SagaStep.objects.filter(kind=SagaStep.Kind.ACTION):
        steps[str(action_step.saga_id)][action_step.name] = action_step
    order_by_saga = orders.audit_orders()
    charges = payments.audit_charges()
    reservations = inventory.audit_reservations()
    live_shipments = shipping.audit_live_shipments()

    def flag(rule: str, subject: str, detail: str) -> None:
        found.append(Violation(rule, subject, detail))

    # Stock is conserved: the reserved counter is exactly what held reservations account for,
    # and no counter is below zero or above what is on hand.
    for row in inventory.audit_stock():
        if row["reserved"] != row["held"]:
            flag(
                "stock_reserved_mismatch", row["sku"], f"reserved={row['reserved']} but held reservations={row['held']}"
            )
        if row["on_hand"] < 0 or row["reserved"] < 0 or row["reserved"] > row["on_hand"]:
            flag("stock_negative", row["sku"], f"on_hand={row['on_hand']} reserved={row['reserved']}")

    # Every saga is terminal at rest, and every order has its saga.
    for saga_id, saga in sagas.items():
        if not saga.is_terminal:
            flag("saga_not_terminal", saga_id, f"state={saga.state}")
    for saga_id, placed in order_by_saga.items():
        if saga_id not in sagas:
            flag("order_without_saga", placed["order_id"], f"order is {placed['status']} and its saga never started")

    # Money is conserved: the ledger matches the charge, a completed order is paid in full, a
    # failed one costs nothing.
    for saga_id, paid in charges.items():
        ledger = {
            "authorized": ([], Decimal("0.00")),
            "captured": (["charge"], paid["amount"]),
            "voided": ([], Decimal("0.00")),
            "declined": ([], Decimal("0.00")),
            "cancelled": ([], Decimal("0.00")),
            "refunded": (["charge", "refund"], Decimal("0.00")),
        }
        entries, net = ledger.get(paid["state"], ([], None))
        if paid["entries"] != entries or paid["net"] != net:
            flag(
                "ledger_mismatch",
                saga_id,
                f"charge {paid['state']} with entries {paid['entries']} net {paid['net']}",
            )
    # Every charge the gateway took is recorded, and refunded in both places or in neither.
    for saga_id, detail in (payments.gateway_mismatches(saga_ids=sagas) if gateway else {}).items():
        flag("gateway_mismatch", saga_id, detail)
    for saga_id, saga in sagas.items():
        charge = charges.get(saga_id)
        order = order_by_saga.get(saga_id)
        try:
            definition = for_saga(saga)
        except UnknownDefinitionVersion as exc:
            flag("unknown_definition_version", saga_id, str(exc))
            continue
        if saga.state == Saga.State.COMPLETED:
            expected = definition.outcome
            if charge is None or charge["state"] != "captured" or (order and charge["amount"] != order["total"]):
                flag("money_not_captured", saga_id, f"completed saga with charge {charge}")
            if order and order["status"] != expected["order"]:
                flag("status_mismatch", saga_id, f"completed saga, order {order['status']}")
            if reservations.get(saga_id, set()) - {"committed"}:
                flag("reservation_mismatch", saga_id, f"completed saga, reservations {sorted(reservations[saga_id])}")
            if live_shipments.get(saga_id) != expected["shipment"]:
                flag("shipment_not_dispatched", saga_id, f"completed saga, shipment {live_shipments.get(saga_id)}")
        elif saga.state in FAILED_OUTCOMES:
            if charge is not None and charge["net"] != 0:
                flag("money_kept", saga_id, f"{saga.state} saga keeps {charge['net']}")
            if charge is not None and charge["state"] == "authorized":
                flag("authorization_leaked", saga_id, f"{saga.state} saga left a hold on the card")
            if reservations.get(saga_id, set()) - {"released"}:
                flag(
                    "reservation_mismatch", saga_id, f"{saga.state} saga, reservations {sorted(reservations[saga_id])}"
                )
            if order and order["status"] not in ("rejected", "cancelled"):
                flag("status_mismatch", saga_id, f"{saga.state} saga, order {order['status']}")
            for spec in definition.steps:
                saga_step = steps[saga_id].get(spec.name)
                if spec.compensation and saga_step and saga_step.state not in UNDONE and not _definitive(saga_step):
                    flag("step_not_compensated", saga_id, f"{spec.name} is {saga_step.state}")

    # No shipment for an order that did not complete, and none dispatched for a cancelled one.
    for saga_id in live_shipments:
        shipped_for = sagas.get(saga_id)
        if shipped_for is None or shipped_for.state in FAILED_OUTCOMES:
            flag("shipment_for_unfulfilled_order", saga_id, f"saga {shipped_for.state if shipped_for else 'missing'}")

    # Every compensation applied at most once (unique barrier rows) and only after its action.
    for alias in settings.SERVICE_ALIASES:
        rows: dict[tuple[str, str], dict[str, tuple]] = defaultdict(dict)
        for saga_id, step, op, outcome, created_at in kernel.barrier_rows(using=alias):
            rows[(saga_id, step)][op] = (outcome, created_at)
        for (saga_id, step), ops in rows.items():
            for op, (outcome, _) in ops.items():
                if outcome is None:
                    flag("barrier_incomplete", f"{alias}:{saga_id}:{step}", f"{op} has no stored outcome")
            compensation = ops.get("compensate")
            if compensation is None or (compensation[0] or {}).get("barrier") == "null_compensation":
                continue
            action = ops.get("action")
            if action is None or (action[0] or {}).get("status") != "succeeded":
                flag(
                    "compensation_without_action",
                    f"{alias}:{saga_id}:{step}",
                    "a compensation took effect with no successful action",
                )
            elif action[1] > compensation[1]:
                flag(
                    "compensation_before_action", f"{alias}:{saga_id}:{step}", "the compensation ran before its action"
                )

    # At rest, nothing is left unpublished.
    for alias in settings.DATABASE_ALIASES:
        stale = kernel.stale_outbox(using=alias)
        if stale:
            flag("outbox_backlog", alias, f"{stale} message(s) unpublished for over 30 s")
    return found


def _definitive(step: SagaStep) -> bool:
    return step.state == SagaStep.State.FAILED and bool((step.error or {}).get("definitive"))
