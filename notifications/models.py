from __future__ import annotations

from django.db import models

from sagaplatform.kernel.ids import new_id


class Notification(models.Model):
    """One message to a customer. Written with the saga step; delivered after commit."""

    class Channel(models.TextChoices):
        EMAIL = "email"
        SMS = "sms"

    class Kind(models.TextChoices):
        ORDER_CONFIRMED = "order_confirmed"
        ORDER_FAILED = "order_failed"
        ORDER_CANCELLED = "order_cancelled"

    class State(models.TextChoices):
        QUEUED = "queued"
        SENT = "sent"

    id = models.UUIDField(primary_key=True, default=new_id, editable=False)
    saga_id = models.UUIDField(db_index=True)
    order_id = models.UUIDField(db_index=True)
    channel = models.CharField(max_length=8, choices=Channel.choices)
    kind = models.CharField(max_length=32, choices=Kind.choices)
    recipient = models.CharField(max_length=254)
    subject = models.CharField(max_length=200, blank=True)
    body = models.TextField()
    state = models.CharField(max_length=8, choices=State.choices, default=State.QUEUED)
    # The outbox message that delivers it, republished while the notification stays queued.
    deliver_message_id = models.UUIDField(null=True, blank=True)
    last_attempt_at = models.DateTimeField(null=True, blank=True)
    created_at = models.DateTimeField(auto_now_add=True)
    sent_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ["-created_at"]
        constraints = [
            models.UniqueConstraint(fields=["order_id", "kind", "channel"], name="notification_once_per_kind"),
        ]
        indexes = [
            # Serves the redelivery of notifications still queued (every few seconds): the few
            # queued ones, not a scan of every notification ever sent.
            models.Index(fields=["last_attempt_at"], name="notification_queued", condition=models.Q(state="queued")),
        ]

    def __str__(self) -> str:
        return f"{self.kind} by {self.channel} to {self.recipient}"
