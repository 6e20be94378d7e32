from __future__ import annotations

from django.db import models

from sagaplatform.kernel.ids import new_id


class Charge(models.Model):
    """Money held or taken from a customer for one saga. A capture writes the ledger entry; a
    refund writes the reverse entry; a void releases a hold that never reached the ledger.
    Never deleted.

    The row is written as `pending` (the intent, with its idempotency key) and committed before
    the gateway is called; the gateway's answer is recorded in a second transaction."""

    class State(models.TextChoices):
        PENDING = "pending"  # the gateway is being asked; its answer is not recorded yet
        DECLINED = "declined"  # the gateway refused the card: nothing held or taken
        CANCELLED = "cancelled"  # given up while pending, when no call could have taken anything
        AUTHORIZED = "authorized"  # funds held on the card, not taken (TCC's try)
        CAPTURED = "captured"
        VOIDED = "voided"  # the hold released, nothing taken
        REFUNDED = "refunded"

    id = models.UUIDField(primary_key=True, default=new_id, editable=False)
    saga_id = models.UUIDField(unique=True)
    order_id = models.UUIDField(db_index=True)
    amount = models.DecimalField(max_digits=12, decimal_places=2)
    currency = models.CharField(max_length=3, default="EUR")
    state = models.CharField(max_length=16, choices=State.choices, default=State.CAPTURED)
    # Known once the gateway has answered.
    gateway_reference = models.CharField(max_length=64, unique=True, null=True, blank=True)
    # Sent with every call for this charge, so a repeated call never charges twice.
    idempotency_key = models.CharField(max_length=80, unique=True, null=True, blank=True)
    # Kept only while the charge is pending (a retry of the call needs it), then erased.
    payment_token = models.CharField(max_length=64, blank=True, default="")
    capture = models.BooleanField(default=True, help_text="take the money, or only hold it (TCC's try)")
    decline_code = models.CharField(max_length=64, blank=True, default="")
    # Gateway calls that may have taken money without our record (in flight, or cut short by a
    # crash). A call answered "unavailable" took nothing and is not counted.
    calls_in_doubt = models.PositiveIntegerField(default=0)
    # Set once the gateway has confirmed the refund; the refund is then recorded in the ledger.
    refund_reference = models.CharField(max_length=64, unique=True, null=True, blank=True)
    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        ordering = ["-created_at"]

    def __str__(self) -> str:
        return f"{self.amount} {self.currency} ({self.state})"


class PaymentMethod(models.Model):
    """A customer's card, registered by the orders service under an opaque reference (`pm_<uuid>`).

    Only this service ever holds the card token: the saga context, the events and the other
    services carry the reference. The row is also written, without a token, by a charge that
    arrives before the registration (`awaited_at`), so the charge knows how long it has waited."""

    reference = models.CharField(max_length=64, unique=True)
    token = models.CharField(max_length=64, blank=True, default="")
    order_id = models.UUIDField(null=True, blank=True, db_index=True)
    registered_at = models.DateTimeField(null=True, blank=True)
    # Set by the first charge that looked for it before it was registered.
    awaited_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ["-id"]

    def __str__(self) -> str:
        return self.reference


class LedgerEntry(models.Model):
    """Append-only money movements: a charge is +amount, a refund -amount. Never updated."""

    class Kind(models.TextChoices):
        CHARGE = "charge"
        REFUND = "refund"

    charge = models.ForeignKey(Charge, on_delete=models.PROTECT, related_name="entries")
    kind = models.CharField(max_length=16, choices=Kind.choices)
    amount = models.DecimalField(max_digits=12, decimal_places=2)
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["created_at"]
        constraints = [
            # One charge entry and at most one refund entry per charge: money moves once.
            models.UniqueConstraint(fields=["charge", "kind"], name="ledger_one_entry_per_kind"),
        ]

    def __str__(self) -> str:
        return f"{self.kind} {self.amount}"
