from __future__ import annotations

from django.db import models

from sagaplatform.kernel.ids import new_id


class StockItem(models.Model):
    """Stock of one SKU. `reserved` units belong to orders in flight and are invisible to others.

    Every change is one conditional UPDATE guarded by `version` (optimistic locking), never a
    read-modify-write in Python: see `inventory.services`.
    """

    sku = models.CharField(max_length=64, unique=True)
    on_hand = models.PositiveIntegerField(default=0)
    reserved = models.PositiveIntegerField(default=0)
    version = models.PositiveBigIntegerField(default=0)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        ordering = ["sku"]
        constraints = [
            models.CheckConstraint(
                condition=models.Q(reserved__lte=models.F("on_hand")), name="stock_reserved_lte_on_hand"
            ),
        ]

    def __str__(self) -> str:
        return f"{self.sku} ({self.available} available)"

    @property
    def available(self) -> int:
        return self.on_hand - self.reserved


class Reservation(models.Model):
    """Units of one SKU held for one saga. Released or committed, never deleted."""

    class State(models.TextChoices):
        HELD = "held"
        RELEASED = "released"
        COMMITTED = "committed"

    id = models.UUIDField(primary_key=True, default=new_id, editable=False)
    saga_id = models.UUIDField(db_index=True)
    order_id = models.UUIDField(db_index=True)
    sku = models.CharField(max_length=64)
    quantity = models.PositiveIntegerField()
    state = models.CharField(max_length=16, choices=State.choices, default=State.HELD)
    # Version conflicts this reservation met before it won: contention per SKU is the sum.
    lock_conflicts = models.PositiveIntegerField(default=0)
    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        ordering = ["created_at"]
        constraints = [
            models.UniqueConstraint(fields=["saga_id", "sku"], name="reservation_one_per_saga_sku"),
        ]

    def __str__(self) -> str:
        return f"{self.quantity} x {self.sku} ({self.state})"
