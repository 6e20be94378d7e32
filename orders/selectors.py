from __future__ import annotations

from django.db.models import QuerySet

from .models import IdempotencyKey, Order, Product

DB = "orders"


def order_list_for_customer(*, customer_id: int) -> QuerySet[Order]:
    return Order.objects.using(DB).filter(customer_id=customer_id).prefetch_related("lines")


def order_get_for_customer(*, order_id, customer_id: int) -> Order | None:
    return order_list_for_customer(customer_id=customer_id).filter(id=order_id).first()


def order_get(*, order_id) -> Order | None:
    return Order.objects.using(DB).prefetch_related("lines").filter(id=order_id).first()


def order_for_idempotency_key(*, customer_id: int, key: str) -> Order | None:
    row = IdempotencyKey.objects.using(DB).filter(customer_id=customer_id, key=key).select_related("order").first()
    return row.order if row else None


def product_list() -> QuerySet[Product]:
    return Product.objects.using(DB).filter(is_active=True)


def audit_orders() -> dict[str, dict]:
    """Saga id -> the order's status and total."""
    return {
        str(saga_id): {"order_id": str(order_id), "status": status, "total": total}
        for saga_id, order_id, status, total in Order.objects.using(DB).values_list("saga_id", "id", "status", "total")
    }
