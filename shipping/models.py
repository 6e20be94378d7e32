from __future__ import annotations

from django.db import models

from sagaplatform.kernel.ids import new_id


class Shipment(models.Model):
    """A parcel booked with a carrier for one saga. Cancelled, never deleted."""

    class State(models.TextChoices):
        TENTATIVE = "tentative"  # held with the carrier, not yet confirmed (TCC's try)
        SCHEDULED = "scheduled"
        DISPATCHED = "dispatched"
        CANCELLED = "cancelled"

    id = models.UUIDField(primary_key=True, default=new_id, editable=False)
    saga_id = models.UUIDField(unique=True)
    order_id = models.UUIDField(db_index=True)
    state = models.CharField(max_length=16, choices=State.choices, default=State.SCHEDULED)
    address = models.JSONField()
    carrier = models.CharField(max_length=32, default="sagapost")
    tracking_number = models.CharField(max_length=32, unique=True)
    dispatched_at = models.DateTimeField(null=True, blank=True)
    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        ordering = ["-created_at"]

    def __str__(self) -> str:
        return f"{self.tracking_number} ({self.state})"
