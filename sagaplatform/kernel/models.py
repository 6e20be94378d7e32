from __future__ import annotations

from django.db import models
from django.db.models.functions import Now

from sagaplatform.kernel.ids import new_id


class Barrier(models.Model):
    """One row per (saga, step, op) a service has handled: DTM's sub-transaction barrier.

    Inserted in the same local transaction as the business change it guards, so the unique key
    turns a redelivered command into a replay of `outcome`, a compensation for an action that
    never ran into a no-op ("null compensation"), and an action arriving after its compensation
    into a refusal ("hanging").
    """

    class Op(models.TextChoices):
        ACTION = "action"  # a saga step, or TCC's try
        COMPENSATE = "compensate"  # its compensation, or TCC's cancel
        CONFIRM = "confirm"  # TCC's confirm

    saga_id = models.UUIDField()
    step = models.CharField(max_length=64)
    op = models.CharField(max_length=16, choices=Op.choices)
    outcome = models.JSONField(null=True, blank=True)
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        constraints = [
            models.UniqueConstraint(fields=["saga_id", "step", "op"], name="kernel_barrier_unique_op"),
        ]

    def __str__(self) -> str:
        return f"{self.saga_id}:{self.step}:{self.op}"


class OutboxMessage(models.Model):
    """A message written in the same local transaction as the state change that implies it.

    The relay publishes it after commit (fast path) or from the periodic sweep (after a crash);
    the message id doubles as the Celery task id, so consumers can tell a republish apart.
    """

    id = models.UUIDField(primary_key=True, default=new_id, editable=False)
    task = models.CharField(max_length=128)
    queue = models.CharField(max_length=64)
    payload = models.JSONField()
    created_at = models.DateTimeField(auto_now_add=True)
    # When it may be published, on the database's clock: written by the database itself unless
    # the caller already holds a database-clock reading (the engine).
    available_at = models.DateTimeField(db_default=Now())
    # Due later (a retry, a handling window): only the relay publishes it, once due on the
    # database clock. A broker countdown would be an ETA on the publisher's clock that another
    # process waits for on its own clock.
    delayed = models.BooleanField(default=False)
    published_at = models.DateTimeField(null=True, blank=True)
    publish_attempts = models.PositiveIntegerField(default=0)
    # The trace context (W3C headers) current when the row was written, so the message joins
    # its order's trace whoever publishes it (sagaplatform/observability/tracing.py). Null when
    # tracing is off.
    trace_context = models.JSONField(null=True, blank=True)

    class Meta:
        indexes = [
            # Serves the relay sweep: unpublished rows that are due.
            models.Index(
                fields=["available_at"],
                name="kernel_outbox_pending",
                condition=models.Q(published_at__isnull=True),
            ),
        ]

    def __str__(self) -> str:
        return f"{self.task} -> {self.queue} ({self.id})"


class FaultRule(models.Model):
    """A fault to inject into a service operation (tests, demos, simulations).

    Lives in the service's own database, so a running worker picks it up within a second.
    """

    class CrashPoint(models.TextChoices):
        NONE = "", "no crash"
        AFTER_CALL = "after_call", "after a call outside the platform (a gateway), before its outcome is recorded"
        BEFORE_COMMIT = "before_commit", "after the work, before the local commit"
        AFTER_COMMIT = "after_commit", "after the local commit, before the reply is published"
        AFTER_REPLY = "after_reply", "after the reply is published, before the message is acknowledged"

    service = models.CharField(max_length=32)
    operation = models.CharField(max_length=64, default="*", help_text="an operation name, or * for all")
    failure_rate = models.FloatField(default=0.0, help_text="share of attempts failing transiently, 0 to 1")
    fail_first = models.PositiveIntegerField(default=0, help_text="attempts 1..N fail transiently")
    latency_ms = models.PositiveIntegerField(default=0, help_text="added before the work")
    hang_seconds = models.FloatField(default=0.0, help_text="block this long before the work")
    crash_point = models.CharField(max_length=16, choices=CrashPoint.choices, blank=True, default="")
    # How many more times to crash (a crash loop would never let anything finish); 0 = spent.
    crashes_left = models.PositiveIntegerField(default=1)
    is_enabled = models.BooleanField(default=True)
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["service", "operation"]

    def __str__(self) -> str:
        return f"{self.service}.{self.operation}"


class DeadLetter(models.Model):
    """A message a worker could not run (malformed, oversized, an unknown task): recorded and
    acknowledged instead of killing the worker or looping. Kept in the database of the queue it
    came from; the orchestrator raises an alert for each (`alerted_at`)."""

    class Reason(models.TextChoices):
        MALFORMED = "malformed", "not a message envelope (not JSON, or missing fields)"
        OVERSIZED = "oversized", "larger than SAGA_MAX_MESSAGE_BYTES"
        UNDECODABLE = "undecodable", "its body could not be decoded"
        UNKNOWN_TASK = "unknown_task", "names a task no worker knows"
        INVALID_TASK = "invalid_task", "a task with invalid arguments or headers"
        FAILED = "failed", "its task failed on what the message says"

    queue = models.CharField(max_length=64)
    reason = models.CharField(max_length=16, choices=Reason.choices)
    task = models.CharField(max_length=128, blank=True)
    message_id = models.CharField(max_length=64, blank=True)
    size = models.PositiveIntegerField(help_text="bytes, as received")
    body = models.TextField(blank=True, help_text="the start of the message, as received")
    error = models.TextField(blank=True)
    created_at = models.DateTimeField(auto_now_add=True)
    alerted_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ["-created_at"]
        indexes = [
            models.Index(
                fields=["created_at"], name="kernel_deadletter_unalerted", condition=models.Q(alerted_at__isnull=True)
            ),
        ]

    def __str__(self) -> str:
        return f"{self.reason} on {self.queue} ({self.task or '?'})"


class ServiceInstance(models.Model):
    """One service hosted by one worker process, as the service registry knows it
    (`sagaplatform/kernel/registry.py`, the database backend). Written by the worker's
    heartbeat; live while `expires_at` (database clock) has not passed. Lives on `default`, the
    orchestrator's database, whose engine resolves a service's queue through it."""

    instance = models.CharField(max_length=255, unique=True, help_text="worker/service")
    worker = models.CharField(max_length=200, help_text="the worker's node name")
    service = models.CharField(max_length=64)
    queues = models.JSONField(default=list, help_text="the queues this instance consumes")
    host = models.CharField(max_length=255)
    pid = models.PositiveIntegerField()
    code_version = models.CharField(max_length=64, blank=True)
    definitions = models.JSONField(default=list, help_text="the saga definition versions it knows")
    started_at = models.DateTimeField()
    heartbeat_at = models.DateTimeField()
    expires_at = models.DateTimeField()
    tasks_running = models.PositiveIntegerField(default=0)
    oldest_task_age = models.FloatField(null=True, blank=True, help_text="seconds, at the last heartbeat")

    class Meta:
        ordering = ["service", "worker"]
        indexes = [models.Index(fields=["expires_at"], name="kernel_instance_expires")]

    def __str__(self) -> str:
        return self.instance
