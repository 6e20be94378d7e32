"""Order writes. Every status change goes through the state machine and appends a history row."""

from __future__ import annotations

import hashlib
import json
import uuid
from dataclasses import dataclass
from datetime import datetime, timedelta
from decimal import Decimal
from typing import Any

from django.conf import settings
from django.db import IntegrityError, connections, transaction
from django.utils import timezone

from sagaplatform.kernel import barrier, choreography, events, outbox, ports, rows, sealing
from sagaplatform.kernel.clock import db_now
from sagaplatform.kernel.commands import ORCHESTRATOR_QUEUE
from sagaplatform.kernel.models import OutboxMessage

from .exceptions import (
    IdempotencyKeyInFlight,
    IdempotencyKeyReused,
    OrderNotInState,
    OrderTooLarge,
    Overloaded,
    UnknownProduct,
)
from .models import CANCELLED_CODE, IdempotencyKey, Order, OrderLine, OrderStatusChange, Product

DB = "orders"
START_SAGA_TASK = "orchestration.start_saga"
REGISTER_PAYMENT_METHOD_TASK = "payments.register_payment_method"
PAYMENTS_QUEUE = "payments"
ORDER_PLACED = events.ORDER_PLACED
# What Order.total (12 digits, 2 decimals) can hold.
MAX_ORDER_TOTAL = Decimal("9999999999.99")


@dataclass(frozen=True)
class Placement:
    order: Order
    receipt: dict
    replayed: bool


def fingerprint(body: dict) -> str:
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":"), default=str).encode()).hexdigest()


def order_receipt(order: Order) -> dict:
    """What the API answers when it accepts an order (and replays for a repeated key)."""
    return {
        "id": str(order.id),
        "status": order.status,
        "saga": {"id": str(order.saga_id), "state": "pending"},
        "url": f"/api/orders/{order.id}/",
    }


def _record(order: Order, from_status: str, reason: str = "") -> None:
    order.save(using=DB)
    OrderStatusChange.objects.using(DB).create(
        order=order, from_status=from_status, to_status=order.status, reason=reason[:500]
    )


def order_place(
    *,
    customer_id: int,
    customer_email: str,
    items: list[dict],
    payment_token: str,
    shipping_address: dict,
    mode: str = Order.Mode.ORCHESTRATED,
    idempotency_key: str | None = None,
    request_body: dict | None = None,
) -> Placement:
    """Accept an order: write it pending and, in the same transaction, the message that starts
    its saga (and the idempotency key, when there is one).

    With a key, the same key and body return the first request's order and receipt; another
    body is refused (`IdempotencyKeyReused`, 422); a request while the first one with the key is
    still being processed is refused too (`IdempotencyKeyInFlight`, 409), so the client retries
    rather than waits. No two requests with one key can place two orders: see `_claim`.
    """
    placing: dict[str, Any] = {
        "customer_id": customer_id,
        "customer_email": customer_email,
        "items": items,
        "payment_token": payment_token,
        "shipping_address": shipping_address,
        "mode": mode,
    }
    if not idempotency_key:
        with transaction.atomic(using=DB):
            order = _create(**placing)
        return Placement(order=order, receipt=order_receipt(order), replayed=False)
    body_fingerprint = fingerprint(request_body if request_body is not None else {"items": items})
    try:
        with transaction.atomic(using=DB):
            if not _claim(customer_id=customer_id, key=idempotency_key):
                raise IdempotencyKeyInFlight(
                    "A request with this Idempotency-Key is still being processed; retry in a moment",
                    details={"idempotency_key": idempotency_key},
                )
            replay = _replay(customer_id=customer_id, key=idempotency_key, body_fingerprint=body_fingerprint)
            if replay:
                return replay
            order = _create(**placing)
            receipt = order_receipt(order)
            IdempotencyKey.objects.using(DB).create(
                customer_id=customer_id,
                key=idempotency_key,
                fingerprint=body_fingerprint,
                order=order,
                response=receipt,
            )
    except IntegrityError:
        # The unique (customer, key) constraint is the backstop behind `_claim`: whatever got
        # past the claim, a second key row cannot commit, and its order rolls back with it.
        replay = _replay(customer_id=customer_id, key=idempotency_key, body_fingerprint=body_fingerprint)
        if not replay:
            raise IdempotencyKeyInFlight(
                "A request with this Idempotency-Key is still being processed; retry in a moment",
                details={"idempotency_key": idempotency_key},
            ) from None
        return replay
    return Placement(order=order, receipt=receipt, replayed=False)


def _claim(*, customer_id: int, key: str) -> bool:
    """Take the key for this transaction; False if another request holds it right now.

    PostgreSQL: a transaction-level advisory lock on a hash of (customer, key), tried without
    waiting. It is held until the order and its key row commit, and released only once they are
    visible, so the next request with the key either finds it held (409) or finds the key row
    (replay). Without it a second request would block on the first one's uncommitted key row.
    SQLite (embedded): every write transaction is IMMEDIATE, so requests with the same key run
    one after the other and the second one replays.
    """
    connection = connections[DB]
    if connection.vendor != "postgresql":
        return True
    digest = hashlib.sha256(f"idempotency-key:{customer_id}:{key}".encode()).digest()
    with connection.cursor() as cursor:
        cursor.execute("SELECT pg_try_advisory_xact_lock(%s)", [int.from_bytes(digest[:8], "big", signed=True)])
        return cursor.fetchone()[0]


def _replay(*, customer_id: int, key: str, body_fingerprint: str) -> Placement | None:
    existing = IdempotencyKey.objects.using(DB).select_related("order").filter(customer_id=customer_id, key=key).first()
    if existing is None:
        return None
    if existing.created_at <= timezone.now() - timedelta(seconds=settings.IDEMPOTENCY_KEY_TTL):
        # Expired: the key is free again (the order it placed stays). Deleted by id, so a
        # purge that got there first costs nothing.
        IdempotencyKey.objects.using(DB).filter(id=existing.id).delete()
        return None
    if existing.fingerprint != body_fingerprint:
        raise IdempotencyKeyReused(
            "This Idempotency-Key was used with a different request body", details={"idempotency_key": key}
        )
    return Placement(order=existing.order, receipt=existing.response, replayed=True)


def idempotency_keys_purge(*, batch: int = 1000) -> int:
    """Delete the keys older than `IDEMPOTENCY_KEY_TTL`, a batch at a time. Returns how many."""
    cutoff = timezone.now() - timedelta(seconds=settings.IDEMPOTENCY_KEY_TTL)
    purged = 0
    while True:
        ids = list(IdempotencyKey.objects.using(DB).filter(created_at__lte=cutoff).values_list("id", flat=True)[:batch])
        if not ids:
            return purged
        purged += IdempotencyKey.objects.using(DB).filter(id__in=ids).delete()[0]


def _create(
    *, customer_id: int, customer_email: str, items: list[dict], payment_token: str, shipping_address: dict, mode: str
) -> Order:
    now = _admit()
    skus = [item["sku"] for item in items]
    products = {p.sku: p for p in Product.objects.using(DB).filter(sku__in=skus, is_active=True)}
    unknown = sorted(set(skus) - set(products))
    if unknown:
        raise UnknownProduct(f"Unknown SKU: {', '.join(unknown)}", details={"unknown_skus": unknown})
    total = sum((products[i["sku"]].unit_price * i["quantity"] for i in items), Decimal("0.00"))
    if total > MAX_ORDER_TOTAL:
        raise OrderTooLarge(f"The order total {total} exceeds {MAX_ORDER_TOTAL}", details={"total": str(total)})
    # Built first and inserted last: its messages' ids and due time go into its own INSERT.
    order = Order(
        customer_id=customer_id,
        customer_email=customer_email,
        total=total,
        mode=mode,
        shipping_address=shipping_address,
    )
    payment_method = f"pm_{uuid.uuid4().hex}"
    context = {
        "order_id": str(order.id),
        "customer_id": customer_id,
        "customer_email": customer_email,
        "items": [{"sku": i["sku"], "quantity": i["quantity"]} for i in items],
        "amount": str(total),
        "currency": order.currency,
        "payment_method": payment_method,
        "shipping_address": shipping_address,
        "mode": mode,
    }
    # The registration goes after the start (tests and tools that step through messages expect
    # the start first), in the same transaction: the charge comes several hops later.
    registration = _registration(order, payment_method, payment_token, now=now)
    messages = [registration]
    if mode == Order.Mode.CHOREOGRAPHY:
        # No coordinator to start: announce the order; the services take it from there. The
        # tracker's copy is the one remembered: it is announced again until the tracker has it.
        event = choreography.event_message(event=ORDER_PLACED, saga_id=order.saga_id, context=context)
        message = choreography.publish(using=DB, message=event)[-1]
    else:
        message = outbox.message(
            task=START_SAGA_TASK,
            queue=ORCHESTRATOR_QUEUE,
            payload={"saga_id": str(order.saga_id), "mode": mode, "context": context},
            now=now,
        )
        messages.insert(0, message)
    order.start_message_id = message.id
    order.announced_at = message.available_at
    order.reannounce_at = message.available_at + REANNOUNCE_AFTER
    lines = [
        OrderLine(order=order, sku=i["sku"], quantity=i["quantity"], unit_price=products[i["sku"]].unit_price)
        for i in items
    ]
    accepted = OrderStatusChange(order=order, from_status="", to_status=order.status, reason="accepted")
    _insert(order, lines, accepted, messages)
    return order


# Numbered by the database.
_SERIAL = frozenset({"id"})


def _insert(order: Order, lines: list[OrderLine], accepted: OrderStatusChange, messages: list[OutboxMessage]) -> None:
    """Write a new order, its lines, its first status and its messages (published together once
    the transaction commits, one mark): on PostgreSQL in one statement of data-modifying CTEs,
    where the ORM took an INSERT each; the messages' due time is the one `_admit` read."""
    connection = connections[DB]
    if connection.vendor != "postgresql":
        outbox.enqueue_many(using=DB, messages=messages)
        order.save(using=DB, force_insert=True)
        OrderLine.objects.using(DB).bulk_create(lines)
        accepted.save(using=DB, force_insert=True)
        return
    parts = [
        rows.insert(OutboxMessage, messages, connection),
        rows.insert(Order, [order], connection),
        rows.insert(OrderLine, lines, connection, fixed=_SERIAL),
    ]
    last_sql, last_params = rows.insert(OrderStatusChange, [accepted], connection, fixed=_SERIAL)
    with connection.cursor() as cursor:
        cursor.execute(
            "WITH " + ", ".join(f"w{i} AS ({sql})" for i, (sql, _) in enumerate(parts)) + " " + last_sql,
            [*(param for _, params in parts for param in params), *last_params],
        )
    for obj in (order, *lines, accepted):
        obj._state.adding, obj._state.db = False, DB
    outbox.written(using=DB, messages=messages)


def _registration(order: Order, reference: str, payment_token: str, *, now: datetime | None = None) -> OutboxMessage:
    """The message that sends the card token to the payments service alone, in the order's
    transaction, under the opaque reference (`pm_<uuid>`) that everything else carries instead.

    The token is sealed for payments (`kernel.sealing`): the orders outbox row and the broker
    message never show it, and this service keeps nothing of it. Payments registers it
    idempotently by reference; a charge that arrives first waits for it (section 10)."""
    return outbox.message(
        task=REGISTER_PAYMENT_METHOD_TASK,
        queue=PAYMENTS_QUEUE,
        payload={
            "reference": reference,
            "order_id": str(order.id),
            # Its saga's: the retention keeps the row (for a re-announcement) until the saga ends.
            "saga_id": str(order.saga_id),
            "sealed_token": sealing.seal(payment_token),
        },
        now=now,
    )


def _reannounce_registrations(order_ids) -> int:
    """Publish again the payment-method registrations of these orders (lost with their start)."""
    ids = list(
        OutboxMessage.objects.using(DB)
        .filter(task=REGISTER_PAYMENT_METHOD_TASK, payload__order_id__in=[str(o) for o in order_ids])
        .values_list("id", flat=True)
    )
    return outbox.republish(using=DB, ids=ids) if ids else 0


def _admit() -> datetime:
    """Refuse a new order while ORDERS_MAX_PENDING orders wait for their saga to decide them.
    Returns the database clock, read with the count (the order's messages are due then).

    Pending orders are the work accepted and not yet done: past the limit, more would only
    queue, and a queue longer than the workers can drain makes leases and deadlines expire on
    work that never started. Those announced over REANNOUNCE_FOR ago (a parked saga) are not
    work in flight. Concurrent requests can each see one slot free, so the limit can be passed
    by as many requests as the web process runs at once. An idempotent replay is never refused.
    """
    limit = settings.ORDERS_MAX_PENDING
    connection = connections[DB]
    if not limit:
        return db_now(DB)
    since = timezone.now() - REANNOUNCE_FOR
    pending_orders = Order.objects.using(DB).filter(status=Order.Status.PENDING, announced_at__gte=since)[:limit]
    if connection.vendor == "postgresql":
        counted, params = pending_orders.values("id").query.sql_with_params()
        with connection.cursor() as cursor:
            cursor.execute(f"SELECT clock_timestamp(), (SELECT count(*) FROM ({counted}) AS pending)", params)  # noqa: S608
            now, pending = cursor.fetchone()
    else:
        now, pending = db_now(DB), pending_orders.count()
    if pending >= limit:
        raise Overloaded("Too many orders are in progress; retry in a moment")
    return now


def _locked(order_id: uuid.UUID | str) -> Order:
    return Order.objects.using(DB).select_for_update().get(id=order_id)


def order_approve(*, order_id: uuid.UUID | str) -> Order:
    with barrier.atomic(DB):
        order = _locked(order_id)
        if order.status == Order.Status.APPROVED:
            return order
        if order.status != Order.Status.PENDING:
            raise OrderNotInState(f"Order is {order.status}, cannot approve", details={"status": order.status})
        order.approve()
        _record(order, Order.Status.PENDING, "all earlier steps succeeded")
    return order


def order_revoke(*, order_id: uuid.UUID | str, reason: str = "") -> Order:
    with barrier.atomic(DB):
        order = _locked(order_id)
        if order.status == Order.Status.APPROVED:
            order.revoke()
            _record(order, Order.Status.APPROVED, reason or "saga compensating")
    return order


def order_reject(*, order_id: uuid.UUID | str, code: str, message: str) -> Order:
    """End a pending order that will not be fulfilled: cancelled if a person asked for it,
    rejected otherwise. Idempotent."""
    with barrier.atomic(DB):
        order = _locked(order_id)
        if order.status == Order.Status.PENDING:
            if code == CANCELLED_CODE:
                order.cancel(message=message)
            else:
                order.reject(code=code, message=message)
            _record(order, Order.Status.PENDING, message)
    return order


def order_ship(*, order_id: uuid.UUID | str) -> Order:
    with barrier.atomic(DB):
        order = _locked(order_id)
        if order.status == Order.Status.APPROVED:
            order.ship()
            _record(order, Order.Status.APPROVED, "the parcel left the warehouse")
        elif order.status != Order.Status.SHIPPED:
            raise OrderNotInState(f"Order is {order.status}, cannot ship", details={"status": order.status})
    return order


REANNOUNCE_AFTER = timedelta(seconds=30)
# Admission counts a pending order as work in flight for this long after it was placed.
REANNOUNCE_FOR = timedelta(hours=1)
# The re-announcement backs off with the order's age (a quarter of it), between these bounds:
# every 30 s in its first two minutes, every 15 min at one hour old, then hourly for ever.
REANNOUNCE_MAX_INTERVAL = timedelta(hours=1)


def _reannounce_next(now, created_at):
    return now + min(max((now - created_at) / 4, REANNOUNCE_AFTER), REANNOUNCE_MAX_INTERVAL)


def _reannounced(orders, now) -> None:
    """Record when each of these (id, created_at) orders is next due, backing off with its age."""
    Order.objects.using(DB).bulk_update(
        [Order(id=order_id, reannounce_at=_reannounce_next(now, created_at)) for order_id, created_at in orders],
        ["reannounce_at"],
    )


def order_cancel(*, order: Order, actor: str, reason: str = ""):
    """Ask the order's saga to cancel (the API, the order page and the admin all come here).

    Returns the saga's summary object from the port; raises an ApiError (409) when the saga
    refuses: the parcel has left or is leaving, or the order already ended. The order's status
    follows once the saga has compensated."""
    return ports.saga_cancel(
        saga_id=order.saga_id,
        context={
            "order_id": str(order.id),
            "customer_email": order.customer_email,
            "shipping_address": order.shipping_address,
            "mode": order.mode,
        },
        actor=actor,
        reason=reason,
    )


def order_reannounce_pending() -> int:
    """Publish the start message of orders still pending when they are due again.

    A broker restart can lose a start message after it was published; nothing else would notice,
    since the orchestrator never heard of the saga. Starting a saga twice is a no-op, so the cost
    of announcing an order whose saga is merely slow is one cheap message. There is no age limit
    (the platform may have been down for hours when the message was lost): each order backs off
    with its age instead (`_reannounce_next`). Choreographed orders are announced until the
    tracker has their saga instead (`_reannounce_untracked`).
    """
    now = db_now(DB)
    reannounced = _reannounce_untracked(now)
    stale = list(
        Order.objects.using(DB)
        .exclude(mode=Order.Mode.CHOREOGRAPHY)
        .filter(status=Order.Status.PENDING, reannounce_at__lte=now, start_message_id__isnull=False)
        .order_by("reannounce_at")
        .values_list("id", "created_at", "start_message_id")[:500]
    )
    if not stale:
        return reannounced
    _reannounced([(order_id, created_at) for order_id, created_at, _ in stale], now)
    _reannounce_registrations([order_id for order_id, _, _ in stale])
    return reannounced + outbox.republish(using=DB, ids=[message_id for _, _, message_id in stale])


def _reannounce_untracked(now) -> int:
    """Announce `order.placed` again for choreographed orders the tracker has no saga for.

    Whatever the order's status: when every copy to the tracker was lost (a broker restart), the
    services may have carried the order forward, or stopped half-way, with no one watching. The
    new announcement is a re-request: each service that already reacted replays its reaction and
    publishes its event again, so the tracker hears the flow and leases what is missing. Once
    the tracker has the saga, its leases take over and the order is no longer announced."""
    stale = list(
        Order.objects.using(DB)
        .filter(mode=Order.Mode.CHOREOGRAPHY, start_message_id__isnull=False, reannounce_at__lte=now)
        .order_by("reannounce_at")
        .values_list("id", "saga_id", "start_message_id", "created_at")[:500]
    )
    if not stale:
        return 0
    tracked = ports.sagas_known([saga_id for _, saga_id, _, _ in stale])
    untracked = [(o, m, created) for o, saga_id, m, created in stale if str(saga_id) not in tracked]
    events = {m.id: m.payload for m in OutboxMessage.objects.using(DB).filter(id__in=[m for _, m, _ in untracked])}
    with transaction.atomic(using=DB):
        Order.objects.using(DB).filter(id__in=[o for o, s, _, _ in stale if str(s) in tracked]).update(
            start_message_id=None
        )
        _reannounced([(order_id, created) for order_id, _, created in untracked], now)
        for _, message_id, _ in untracked:
            if message_id in events:
                choreography.publish(using=DB, message={**events[message_id], "nudge": True})
    _reannounce_registrations([order_id for order_id, _, _ in untracked])
    return len(untracked)


def order_check_pending(*, order_id: uuid.UUID | str) -> Order:
    """TCC's try for the order: it must still be pending (nothing to hold: the order is ours)."""
    order = Order.objects.using(DB).get(id=order_id)
    if order.status != Order.Status.PENDING:
        raise OrderNotInState(f"Order is {order.status}", details={"status": order.status})
    return order
