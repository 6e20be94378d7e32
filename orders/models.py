from __future__ import annotations

from django.db import models
from django_fsm import FSMField, FSMModelMixin, transition

from sagaplatform.kernel.ids import new_id

# The failure code a saga carries when a person cancelled it.
CANCELLED_CODE = "cancelled"


class Product(models.Model):
    """What the shop sells and at what price. Stock levels belong to the inventory service."""

    sku = models.CharField(max_length=64, unique=True)
    name = models.CharField(max_length=200)
    unit_price = models.DecimalField(max_digits=10, decimal_places=2)
    is_active = models.BooleanField(default=True)

    class Meta:
        ordering = ["sku"]

    def __str__(self) -> str:
        return f"{self.sku} {self.name}"


class Order(FSMModelMixin, models.Model):
    """The customer's view of a purchase, visible from the moment the API accepts it."""

    class Mode(models.TextChoices):
        """How the order's distributed transaction runs (see docs/ARCHITECTURE.md, "Styles")."""

        ORCHESTRATED = "orchestrated", "orchestrated saga, one step after another"
        PARALLEL = "parallel", "orchestrated saga, stock and payment side by side"
        TCC = "tcc", "try-confirm-cancel: hold everything, then confirm all or cancel all"
        CHOREOGRAPHY = "choreography", "choreography: services react to each other's events"

    class Status(models.TextChoices):
        PENDING = "pending"
        APPROVED = "approved"
        SHIPPED = "shipped"
        REJECTED = "rejected"
        CANCELLED = "cancelled"

    id = models.UUIDField(primary_key=True, default=new_id, editable=False)
    customer_id = models.BigIntegerField(db_index=True)
    customer_email = models.EmailField(blank=True)
    status = FSMField(default=Status.PENDING, choices=Status.choices, protected=True)
    total = models.DecimalField(max_digits=12, decimal_places=2)
    currency = models.CharField(max_length=3, default="EUR")
    mode = models.CharField(max_length=16, choices=Mode.choices, default=Mode.ORCHESTRATED)
    shipping_address = models.JSONField()
    saga_id = models.UUIDField(unique=True, default=new_id)
    # The outbox message that starts the saga, when it was first published, and when it is next
    # due to be published again: a pending order is announced again until its saga decides it; a
    # choreographed one (this is then the tracker's copy of `order.placed`) until the tracker has
    # its saga, and the field is cleared (see `order_reannounce_pending`).
    start_message_id = models.UUIDField(null=True, blank=True)
    announced_at = models.DateTimeField(null=True, blank=True)
    reannounce_at = models.DateTimeField(null=True, blank=True)
    failure_code = models.CharField(max_length=64, blank=True)
    failure_message = models.CharField(max_length=500, blank=True)
    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        ordering = ["-created_at"]
        indexes = [
            # Serves admission (orders pending and announced lately).
            models.Index(fields=["announced_at"], name="order_pending_announced", condition=models.Q(status="pending")),
            # Serve the re-announcement of pending orders, and of choreographed orders the tracker
            # has not heard of.
            models.Index(
                fields=["reannounce_at"], name="order_pending_reannounce", condition=models.Q(status="pending")
            ),
            models.Index(
                fields=["reannounce_at"],
                name="order_untracked_reannounce",
                condition=models.Q(mode="choreography", start_message_id__isnull=False),
            ),
        ]

    def __str__(self) -> str:
        return f"Order {self.id} ({self.status})"

    # The state machine, top to bottom. Transitions change fields only; services persist them
    # and record the history row.

    @transition(field=status, source=Status.PENDING, target=Status.APPROVED)
    def approve(self) -> None:
        pass

    @transition(field=status, source=Status.APPROVED, target=Status.PENDING)
    def revoke(self) -> None:
        """Undo an approval while the saga compensates; the order then ends rejected."""

    @transition(field=status, source=Status.APPROVED, target=Status.SHIPPED)
    def ship(self) -> None:
        """The parcel left the warehouse (the saga's point of no return)."""

    @transition(field=status, source=Status.PENDING, target=Status.REJECTED)
    def reject(self, *, code: str, message: str) -> None:
        self.failure_code = code[:64]
        self.failure_message = message[:500]

    @transition(field=status, source=Status.PENDING, target=Status.CANCELLED)
    def cancel(self, *, message: str) -> None:
        self.failure_code = CANCELLED_CODE
        self.failure_message = message[:500]


class OrderLine(models.Model):
    order = models.ForeignKey(Order, on_delete=models.PROTECT, related_name="lines")
    sku = models.CharField(max_length=64)
    quantity = models.PositiveIntegerField()
    unit_price = models.DecimalField(max_digits=10, decimal_places=2)

    class Meta:
        ordering = ["sku"]
        constraints = [models.UniqueConstraint(fields=["order", "sku"], name="order_line_unique_sku")]

    def __str__(self) -> str:
        return f"{self.quantity} x {self.sku}"


class OrderStatusChange(models.Model):
    """Append-only history of an order's status: who, from, to, why, when."""

    order = models.ForeignKey(Order, on_delete=models.PROTECT, related_name="status_changes")
    from_status = models.CharField(max_length=16)
    to_status = models.CharField(max_length=16)
    reason = models.CharField(max_length=500, blank=True)
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["created_at", "id"]

    def __str__(self) -> str:
        return f"{self.from_status} -> {self.to_status}"


class IdempotencyKey(models.Model):
    """A client's `Idempotency-Key`, created in the same transaction as the order it produced.

    Remembered for `IDEMPOTENCY_KEY_TTL` seconds: an expired key is replaced when it is used
    again, and `manage.py purge_idempotency_keys` deletes the rest (the orders stay).
    """

    customer_id = models.BigIntegerField()
    key = models.CharField(max_length=255)
    # SHA-256 of the validated request body: the same key with another body is refused.
    fingerprint = models.CharField(max_length=64)
    order = models.ForeignKey(Order, on_delete=models.PROTECT, related_name="+")
    response = models.JSONField()
    # Indexed for the purge of expired keys.
    created_at = models.DateTimeField(auto_now_add=True, db_index=True)

    class Meta:
        constraints = [models.UniqueConstraint(fields=["customer_id", "key"], name="idempotency_key_per_customer")]

    def __str__(self) -> str:
        return self.key
