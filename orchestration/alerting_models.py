"""Alert delivery's tables (imported by `models.py`): where alerts go (channels), what fired
(notification groups, one per rule and cause) and each notification sent to each channel
(deliveries). The rules and the delivery itself are in `alerting.py`."""

from __future__ import annotations

import base64
import secrets

from django.db import models
from django.db.models import Q

from sagaplatform.kernel.ids import new_id


def new_signing_secret() -> str:
    """A Standard Webhooks secret: `whsec_` and 32 random bytes, base64."""
    return "whsec_" + base64.b64encode(secrets.token_bytes(32)).decode()


def mask_secret(secret: str) -> str:
    """What is shown of a secret: its prefix and its last four characters."""
    if not secret:
        return ""
    return f"whsec_…{secret[-4:]}"


class AlertChannel(models.Model):
    """Where notifications go: e-mail addresses, or an HTTP(S) webhook signed with `secret`.
    Channels from the environment (`ALERT_EMAIL_TO`, `ALERT_WEBHOOK_URL`) are kept here too, with
    `source = env`, and refreshed from it at each evaluation."""

    class Kind(models.TextChoices):
        EMAIL = "email"
        WEBHOOK = "webhook"

    name = models.CharField(max_length=64, unique=True)
    kind = models.CharField(max_length=16, choices=Kind.choices)
    # E-mail: addresses separated by commas. Webhook: the http(s) URL.
    target = models.CharField(max_length=500)
    secret = models.CharField(max_length=200, blank=True, help_text="Webhook signing key (whsec_…).")
    min_severity = models.CharField(max_length=16, default="warning")
    enabled = models.BooleanField(default=True)
    source = models.CharField(max_length=8, default="admin")  # admin, api or env
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["name"]

    def __str__(self) -> str:
        return f"{self.name} ({self.kind})"

    @property
    def masked_secret(self) -> str:
        return mask_secret(self.secret)


class AlertGroup(models.Model):
    """One alert condition with its cause (`key`: the rule and its labels), from when it fired
    until it resolved. Many sagas parked by the same cause make one group with a count."""

    class Status(models.TextChoices):
        FIRING = "firing"
        RESOLVED = "resolved"

    key = models.CharField(max_length=200)
    rule = models.CharField(max_length=64)
    severity = models.CharField(max_length=16)
    labels = models.JSONField(default=dict)
    summary = models.CharField(max_length=300)
    description = models.TextField(blank=True)
    runbook_url = models.CharField(max_length=300, blank=True)
    count = models.PositiveIntegerField(default=0)
    status = models.CharField(max_length=16, choices=Status.choices, default=Status.FIRING)
    started_at = models.DateTimeField()
    updated_at = models.DateTimeField()
    last_notified_at = models.DateTimeField(null=True, blank=True)
    resolved_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ["-started_at"]
        constraints = [
            models.UniqueConstraint(fields=["key"], condition=Q(status="firing"), name="alertgroup_one_firing_per_key")
        ]

    def __str__(self) -> str:
        return f"{self.rule} {self.status}: {self.summary}"


class AlertDelivery(models.Model):
    """One notification (firing, repeat or resolved) of a group to one channel. Its `id` is the
    Standard Webhooks `webhook-id`: every retry of the delivery carries the same one."""

    class State(models.TextChoices):
        PENDING = "pending"
        DELIVERED = "delivered"
        FAILED = "failed"

    id = models.UUIDField(primary_key=True, default=new_id, editable=False)
    group = models.ForeignKey(AlertGroup, on_delete=models.CASCADE, related_name="deliveries")
    channel = models.ForeignKey(AlertChannel, on_delete=models.CASCADE, related_name="deliveries")
    status = models.CharField(max_length=16)  # firing or resolved: what this notification says
    payload = models.JSONField(default=dict)
    state = models.CharField(max_length=16, choices=State.choices, default=State.PENDING)
    attempts = models.PositiveSmallIntegerField(default=0)
    last_error = models.CharField(max_length=500, blank=True)
    last_status_code = models.PositiveSmallIntegerField(null=True, blank=True)
    created_at = models.DateTimeField(auto_now_add=True)
    next_attempt_at = models.DateTimeField(null=True, blank=True)
    finished_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ["-created_at"]
        verbose_name_plural = "alert deliveries"

    def __str__(self) -> str:
        return f"{self.status} to {self.channel_id}: {self.state}"

    @property
    def webhook_id(self) -> str:
        return f"msg_{self.id.hex}"
