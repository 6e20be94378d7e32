from __future__ import annotations

from django.conf import settings
from django.db import models
from django.db.models.fields.json import KT
from django.db.models.functions import Cast, Upper
from django.utils import timezone
from django_fsm import FSMField, FSMModelMixin, transition

from sagaplatform.kernel.ids import new_id


def key_text(path: str) -> Cast:
    """The text of a JSON key (`context__order_id`), compared as plain text on every backend
    (SQLite reads a bare KT's right-hand side as JSON) and indexed as such."""
    return Cast(KT(path), models.TextField())


class Saga(FSMModelMixin, models.Model):
    """One distributed transaction. Its steps and events hang off it; its id is the idempotency
    key of everything the services do for it."""

    class State(models.TextChoices):
        PENDING = "pending"
        RUNNING = "running"
        CONFIRMING = "confirming"  # TCC: every try succeeded, confirms under way (no way back)
        COMPENSATING = "compensating"
        COMPLETED = "completed"
        COMPENSATED = "compensated"
        FAILED = "failed"
        PARKED = "parked"
        CANCELLED = "cancelled"

    TERMINAL_STATES = (State.COMPLETED, State.COMPENSATED, State.FAILED, State.CANCELLED)

    id = models.UUIDField(primary_key=True, default=new_id, editable=False)
    definition = models.CharField(max_length=64)
    # The exact definition it runs, recorded at its start (`definitions.for_saga`): the content
    # hash of the step graph (a `DefinitionSnapshot`) and its human label ("place_order v1").
    # Empty for a saga started before definitions were versioned (it runs the code's).
    definition_hash = models.CharField(max_length=64, blank=True, default="")
    definition_label = models.CharField(max_length=96, blank=True, default="")
    # Indexed first in saga_state_created, which serves a filter on the state alone too.
    state = FSMField(default=State.PENDING, choices=State.choices, protected=True)
    context = models.JSONField(default=dict)
    failure = models.JSONField(null=True, blank=True)
    # Bumped on every recorded event: the event sequence number, and the guard against two
    # writers (every engine write holds the row lock and bumps it).
    version = models.PositiveIntegerField(default=0)
    # The global deadline (database clock). Cleared once it no longer applies: after the pivot
    # a saga only goes forward, and a finished saga has none.
    deadline_at = models.DateTimeField(null=True, blank=True)
    created_at = models.DateTimeField(auto_now_add=True, db_index=True)
    updated_at = models.DateTimeField(auto_now=True)
    finished_at = models.DateTimeField(null=True, blank=True)
    # When the retention purged its step-level timeline (orchestration/retention.py); null: kept.
    history_purged_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ["-created_at"]
        indexes = [
            # Serves the overview's latency (sagas finished in the last minutes) and the saga
            # retention (finished long ago, timeline not yet purged): a purged saga leaves it.
            models.Index(
                fields=["finished_at"],
                name="saga_finished_unpurged",
                condition=models.Q(finished_at__isnull=False, history_purged_at__isnull=True),
            ),
            # Serves the sweeper's "which running sagas are past their deadline".
            models.Index(
                fields=["deadline_at"], name="saga_deadline_open", condition=models.Q(deadline_at__isnull=False)
            ),
            # The operators' search (orchestration/filters.py) over the whole history: an order,
            # a customer, a failure code; the newest first within a definition or a state. (A
            # SKU is found through a GIN index on `context`, PostgreSQL only: migration 0004.)
            models.Index(key_text("context__order_id"), name="saga_order_id"),
            models.Index(Upper(key_text("context__customer_email")), name="saga_customer_email"),
            models.Index(key_text("context__customer_id"), name="saga_customer_id"),
            models.Index(key_text("failure__code"), "created_at", name="saga_failure_code"),
            models.Index(fields=["definition", "-created_at"], name="saga_definition_created"),
            models.Index(fields=["state", "-created_at"], name="saga_state_created"),
        ]
        permissions = [("operate_saga", "Can retry, skip and cancel sagas")]

    def __str__(self) -> str:
        return f"{self.definition} {self.id} ({self.state})"

    @property
    def is_terminal(self) -> bool:
        return self.state in self.TERMINAL_STATES

    @transition(field=state, source=State.PENDING, target=State.RUNNING)
    def start(self) -> None:
        pass

    @transition(field=state, source=State.RUNNING, target=State.CONFIRMING)
    def begin_confirm(self) -> None:
        """TCC: the decision to commit. From here the saga only goes forward."""

    @transition(field=state, source=[State.RUNNING, State.CONFIRMING], target=State.COMPLETED)
    def complete(self) -> None:
        pass

    @transition(field=state, source=State.RUNNING, target=State.COMPENSATING)
    def begin_compensation(self, *, failure: dict) -> None:
        self.failure = failure

    @transition(field=state, source=State.COMPENSATING, target=State.COMPENSATED)
    def finish_compensation(self) -> None:
        pass

    @transition(field=state, source=State.COMPENSATING, target=State.CANCELLED)
    def finish_cancellation(self) -> None:
        """Compensated because a person cancelled it, not because a step failed."""

    @transition(field=state, source=[State.RUNNING, State.CONFIRMING, State.COMPENSATING], target=State.PARKED)
    def park(self) -> None:
        """Stop and wait for an operator: a compensation gave up, or a step failed after the pivot."""

    @transition(field=state, source=State.PARKED, target=State.RUNNING)
    def resume_forward(self) -> None:
        pass

    @transition(field=state, source=State.PARKED, target=State.COMPENSATING)
    def resume_compensation(self) -> None:
        pass

    @transition(field=state, source=State.COMPENSATING, target=State.RUNNING)
    def abort_cancellation(self) -> None:
        """Choreography: a cancellation the services refused (the parcel had left)."""

    @transition(field=state, source=State.PARKED, target=State.CONFIRMING)
    def resume_confirm(self) -> None:
        pass

    @transition(field=state, source=[State.PENDING, State.RUNNING, State.COMPENSATING], target=State.FAILED)
    def fail(self, *, failure: dict) -> None:
        self.failure = failure


class DefinitionSnapshot(models.Model):
    """A saga definition as it was when a saga started on it: its graph as data, keyed by its
    content hash. Written once per version (`definitions.record`), never changed; a saga loads
    its own (`definitions.for_saga`) however the code changed since."""

    digest = models.CharField(max_length=64, primary_key=True)
    name = models.CharField(max_length=64)
    version = models.CharField(max_length=32)
    graph = models.JSONField()
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["name", "created_at"]

    def __str__(self) -> str:
        return f"{self.name} v{self.version} ({self.digest[:12]})"

    @property
    def label(self) -> str:
        return f"{self.name} v{self.version}"


class SagaStep(FSMModelMixin, models.Model):
    class Kind(models.TextChoices):
        ACTION = "action"
        ON_FAILURE = "on_failure"

    class State(models.TextChoices):
        PENDING = "pending"
        RUNNING = "running"
        RETRYING = "retrying"
        SUCCEEDED = "succeeded"
        FAILED = "failed"
        COMPENSATING = "compensating"
        COMPENSATED = "compensated"
        COMPENSATION_FAILED = "compensation_failed"
        SKIPPED = "skipped"
        CONFIRMING = "confirming"  # TCC
        CONFIRMED = "confirmed"
        CONFIRM_FAILED = "confirm_failed"

    # No index of its own: saga_step_unique_name (saga, name) serves every lookup by saga.
    saga = models.ForeignKey(Saga, on_delete=models.CASCADE, related_name="steps", db_index=False)
    name = models.CharField(max_length=64)
    kind = models.CharField(max_length=16, choices=Kind.choices, default=Kind.ACTION)
    position = models.PositiveSmallIntegerField()
    service = models.CharField(max_length=32)
    state = FSMField(default=State.PENDING, choices=State.choices, protected=True)
    attempts = models.PositiveIntegerField(default=0)
    compensation_attempts = models.PositiveIntegerField(default=0)
    confirm_attempts = models.PositiveIntegerField(default=0)
    # Transient failures met while the service's circuit breaker refused calls: not counted
    # against the retry policy (orchestration/engine/deferral.py).
    deferrals = models.PositiveIntegerField(default=0)
    next_attempt_at = models.DateTimeField(null=True, blank=True)
    # The lease on the attempt in flight (database clock): past it without a reply, the attempt
    # counts as timed out. Set while running, retrying or compensating; cleared otherwise.
    deadline_at = models.DateTimeField(null=True, blank=True)
    # When the command of the attempt in flight was due to go out (database clock). A lease
    # that expires while the command is still queued, or its answer is, is extended instead
    # of counted, for up to SAGA_QUEUE_WAIT_LIMIT from here. Null: no allowance (the deadline
    # expired the lease on purpose).
    sent_at = models.DateTimeField(null=True, blank=True)
    started_at = models.DateTimeField(null=True, blank=True)
    finished_at = models.DateTimeField(null=True, blank=True)
    result = models.JSONField(null=True, blank=True)
    error = models.JSONField(null=True, blank=True)
    # Choreography: the event that started this step, which the tracker publishes again if the
    # expected outcome does not come.
    trigger = models.JSONField(null=True, blank=True)

    class Meta:
        ordering = ["saga", "kind", "position"]
        constraints = [models.UniqueConstraint(fields=["saga", "name"], name="saga_step_unique_name")]
        indexes = [
            # Serves the sweeper's "which leases have expired".
            models.Index(
                fields=["deadline_at"], name="saga_step_lease_open", condition=models.Q(deadline_at__isnull=False)
            ),
            # The operators' search by step (orchestration/filters.py): a step in a state, or
            # with an error recorded.
            models.Index(fields=["name", "state"], name="saga_step_name_state"),
            models.Index(fields=["name"], name="saga_step_name_error", condition=models.Q(error__isnull=False)),
            # The `retrying` flag of every saga list (selectors.saga_list): the few steps
            # waiting out a backoff, rather than a scan of every step.
            models.Index(
                fields=["saga"],
                name="saga_step_backing_off",
                condition=models.Q(state="retrying") | models.Q(next_attempt_at__isnull=False),
            ),
        ]

    def __str__(self) -> str:
        return f"{self.name} ({self.state})"

    @transition(field=state, source=State.PENDING, target=State.RUNNING)
    def dispatch(self) -> None:
        self.attempts = 1
        self.next_attempt_at = None

    @transition(field=state, source=[State.RUNNING, State.RETRYING], target=State.RETRYING)
    def schedule_retry(self, *, error: dict, next_attempt_at) -> None:
        self.error = error
        self.attempts += 1
        self.next_attempt_at = next_attempt_at

    @transition(field=state, source=[State.RUNNING, State.RETRYING], target=State.SUCCEEDED)
    def succeed(self, *, result: dict) -> None:
        self.result = result
        self.next_attempt_at = None

    @transition(field=state, source=[State.RUNNING, State.RETRYING], target=State.FAILED)
    def fail(self, *, error: dict) -> None:
        self.error = error
        self.next_attempt_at = None

    # A failed step is compensated too when its last attempt's fate is unknown (retries
    # exhausted): the barrier makes that a no-op if the action never committed. A TCC try still
    # in flight is cancelled at once: the barrier refuses it if the cancel arrives first.
    @transition(
        field=state, source=[State.SUCCEEDED, State.FAILED, State.RUNNING, State.RETRYING], target=State.COMPENSATING
    )
    def begin_compensation(self) -> None:
        self.compensation_attempts = 1
        self.next_attempt_at = None

    @transition(field=state, source=State.COMPENSATING, target=State.COMPENSATING)
    def schedule_compensation_retry(self, *, error: dict, next_attempt_at) -> None:
        self.error = error
        self.compensation_attempts += 1
        self.next_attempt_at = next_attempt_at

    @transition(field=state, source=State.COMPENSATING, target=State.COMPENSATED)
    def finish_compensation(self) -> None:
        self.next_attempt_at = None

    @transition(field=state, source=State.COMPENSATING, target=State.COMPENSATION_FAILED)
    def give_up_compensation(self, *, error: dict) -> None:
        self.error = error
        self.next_attempt_at = None

    # TCC's confirm phase.

    @transition(field=state, source=State.SUCCEEDED, target=State.CONFIRMING)
    def begin_confirm(self) -> None:
        self.confirm_attempts = 1

    @transition(field=state, source=State.CONFIRMING, target=State.CONFIRMING)
    def schedule_confirm_retry(self, *, error: dict, next_attempt_at) -> None:
        self.error = error
        self.confirm_attempts += 1
        self.next_attempt_at = next_attempt_at

    @transition(field=state, source=State.CONFIRMING, target=State.CONFIRMED)
    def finish_confirm(self) -> None:
        self.next_attempt_at = None

    @transition(field=state, source=State.CONFIRMING, target=State.CONFIRM_FAILED)
    def give_up_confirm(self, *, error: dict) -> None:
        self.error = error
        self.next_attempt_at = None

    @transition(field=state, source=State.CONFIRM_FAILED, target=State.CONFIRMING)
    def retry_confirm(self) -> None:
        self.confirm_attempts += 1

    # Operator actions (audited by the engine with who, when and why).

    @transition(field=state, source=[State.RUNNING, State.RETRYING, State.FAILED], target=State.RUNNING)
    def retry_now(self) -> None:
        """A new attempt at once: a stuck step, or a step that failed after the pivot."""
        self.attempts += 1
        self.next_attempt_at = None

    @transition(field=state, source=State.COMPENSATION_FAILED, target=State.COMPENSATING)
    def retry_compensation(self) -> None:
        self.compensation_attempts += 1
        self.next_attempt_at = None

    @transition(field=state, source=State.COMPENSATION_FAILED, target=State.SKIPPED)
    def skip_compensation(self) -> None:
        """An operator settled this step by hand; the saga goes on compensating the rest."""


class SagaEvent(models.Model):
    """Append-only timeline of a saga: every transition, retry and failure, in order (`seq`)."""

    # No index of its own: saga_event_unique_seq (saga, seq) serves every lookup by saga.
    saga = models.ForeignKey(Saga, on_delete=models.CASCADE, related_name="events", db_index=False)
    seq = models.PositiveIntegerField()
    step = models.CharField(max_length=64, blank=True)
    kind = models.CharField(max_length=32)
    from_state = models.CharField(max_length=24, blank=True)
    to_state = models.CharField(max_length=24, blank=True)
    data = models.JSONField(default=dict, blank=True)
    actor = models.CharField(max_length=150, default="engine")
    # Database time, set by the engine (workers' clocks may disagree); now() only as a fallback.
    created_at = models.DateTimeField(default=timezone.now)

    class Meta:
        ordering = ["saga", "seq"]
        constraints = [models.UniqueConstraint(fields=["saga", "seq"], name="saga_event_unique_seq")]

    def __str__(self) -> str:
        return f"#{self.seq} {self.kind} {self.step}"


class Alert(models.Model):
    """Something a person must look at: a parked saga, or a message a worker dead-lettered (no
    saga: the message could not even be read). Resolved by an operator's action."""

    class Kind(models.TextChoices):
        SAGA_PARKED = "saga_parked"
        DEAD_LETTER = "dead_letter"

    saga = models.ForeignKey(Saga, on_delete=models.CASCADE, related_name="alerts", null=True, blank=True)
    kind = models.CharField(max_length=32, choices=Kind.choices)
    message = models.CharField(max_length=500)
    created_at = models.DateTimeField(auto_now_add=True)
    resolved_at = models.DateTimeField(null=True, blank=True)
    resolved_by = models.CharField(max_length=150, blank=True)

    class Meta:
        ordering = ["-created_at"]
        indexes = [models.Index(fields=["resolved_at", "created_at"], name="alert_open")]

    def __str__(self) -> str:
        return f"{self.kind}: {self.message}"


class SavedView(models.Model):
    """An operator's saved dashboard view: a name and the filters' query string."""

    user = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="saga_views")
    name = models.CharField(max_length=80)
    query = models.CharField(max_length=2000, blank=True)
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["name"]
        constraints = [models.UniqueConstraint(fields=["user", "name"], name="saved_view_unique_name")]

    def __str__(self) -> str:
        return f"{self.name} ({self.user_id})"


# Alert delivery (channels, notification groups, deliveries): orchestration/alerting.py.
from .alerting_models import AlertChannel, AlertDelivery, AlertGroup  # noqa: E402, F401
