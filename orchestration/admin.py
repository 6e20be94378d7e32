"""Admin for sagas: read-only history, and the operator actions (retry, skip, cancel) with a reason.

Every action goes through the engine (`saga_retry`, `saga_skip`, `saga_cancel`), which decides
again under the saga's row lock and records the operator's name and reason as a `SagaEvent`.
Before that, the engine's own rules (`rules.py`) screen the selection: a row they refuse is left
alone and reported with the engine's reason, never sent to the engine. Nothing here writes a saga
or a step directly, so the invariants `manage.py audit` checks hold whatever an operator clicks.
"""

from __future__ import annotations

from django.contrib import admin, messages
from django.db.models import Exists, OuterRef
from django.db.models.functions import Now
from django.utils.html import format_html

from sagaplatform.api import operator_actor
from sagaplatform.kernel.admin import (
    ActionRefused,
    ReadOnlyAdminMixin,
    ReadOnlyInline,
    action_with_reason,
    age_filter,
    order_link,
    saga_link,
    short_id,
)
from sagaplatform.kernel.clock import db_now

from . import engine, live, rules, selectors
from .definitions import DEFINITIONS, MODES
from .exceptions import OperationNotAllowed
from .models import Alert, DefinitionSnapshot, Saga, SagaEvent, SagaStep, SavedView
from .permissions import OPERATE

DB = "default"


# The style each definition runs: orchestrated, parallel, tcc, choreography.
STYLE_OF_DEFINITION = {name: live.style_of(definition) for name, definition in DEFINITIONS.items()}


def style_of(saga: Saga) -> str:
    return STYLE_OF_DEFINITION.get(saga.definition, "?")


# --- The guards: the rules the engine applies (orchestration/rules.py) --------------------------


def _said(verdict: rules.Verdict) -> str | None:
    """None if allowed, else the engine's reason (as a clause: "left alone (a ...)")."""
    return None if verdict.allowed else verdict.message[:1].lower() + verdict.message[1:]


def _now(saga: Saga):
    return getattr(saga, "db_now", None) or db_now(DB)


def retry_refusal(saga: Saga) -> str | None:
    return _said(rules.retry_verdict(saga, saga.steps.all()))


def skip_refusal(saga: Saga) -> str | None:
    return _said(rules.skip_verdict(saga, saga.steps.all()))


def cancel_refusal(saga: Saga) -> str | None:
    return _said(rules.cancel_verdict(saga, saga.steps.all(), now=_now(saga)))  # the engine decides again


def _engine(call):
    try:
        return call()
    except OperationNotAllowed as exc:
        raise ActionRefused(exc.message) from exc


# --- Actions ---------------------------------------------------------------------------------


@admin.action(description="Retry the selected parked or stuck sagas", permissions=["operate"])
def retry_sagas(modeladmin, request, queryset):
    return action_with_reason(
        modeladmin,
        request,
        queryset,
        title="Retry sagas",
        guard=retry_refusal,
        apply=lambda saga, actor, reason: _engine(
            lambda: engine.saga_retry(saga_id=saga.id, actor=actor, reason=reason)
        ),
        done="retried",
    )


@admin.action(description="Skip the parked compensations of the selected sagas", permissions=["operate"])
def skip_parked_compensations(modeladmin, request, queryset):
    def skip(saga, actor, reason):
        verdict = rules.skip_verdict(saga, saga.steps.using(DB).all())
        refusal = _said(verdict)  # None: allowed
        if refusal is not None:
            raise ActionRefused(refusal)
        for step_name in verdict.steps:
            _engine(
                lambda step_name=step_name: engine.saga_skip(
                    saga_id=saga.id, step_name=step_name, actor=actor, reason=reason
                )
            )

    return action_with_reason(
        modeladmin,
        request,
        queryset,
        title="Skip parked compensations",
        guard=skip_refusal,
        apply=skip,
        done="settled by hand",
    )


@admin.action(description="Cancel the selected sagas (compensate what succeeded)", permissions=["operate"])
def cancel_sagas(modeladmin, request, queryset):
    return action_with_reason(
        modeladmin,
        request,
        queryset,
        title="Cancel sagas",
        guard=cancel_refusal,
        apply=lambda saga, actor, reason: _engine(
            lambda: engine.saga_cancel(saga_id=saga.id, context=saga.context, actor=actor, reason=reason)
        ),
        done="cancelled",
    )


# --- List filters -----------------------------------------------------------------------------


class StyleFilter(admin.SimpleListFilter):
    """The order's transaction style, from the saga's definition."""

    title = "style"
    parameter_name = "style"

    def lookups(self, request, model_admin):
        return [(style, style) for style in MODES]

    def queryset(self, request, queryset):
        if self.value() is None:
            return queryset
        return queryset.filter(
            definition__in=[name for name, label in STYLE_OF_DEFINITION.items() if label == self.value()]
        )


class AttentionFilter(admin.SimpleListFilter):
    """What needs a person: the same "stuck" as the dashboard (docs/LIVE_FEED.md)."""

    title = "needs attention"
    parameter_name = "attention"

    def lookups(self, request, model_admin):
        return [
            ("stuck", "stuck (a lease expired, or parked)"),
            ("parked", "parked"),
            ("retrying", "waiting to retry"),
            ("alert", "open alert"),
        ]

    def queryset(self, request, queryset):
        # `stuck` and `retrying` are `selectors.saga_list`'s annotations: the dashboard's and
        # the operator API's definitions, on the database clock.
        value = self.value()
        if value == "stuck":
            return queryset.filter(stuck=True)
        if value == "parked":
            return queryset.filter(state=Saga.State.PARKED)
        if value == "retrying":
            return queryset.filter(retrying=True)
        if value == "alert":
            return queryset.filter(Exists(Alert.objects.filter(saga=OuterRef("pk"), resolved_at__isnull=True)))
        return queryset


# --- Admins -----------------------------------------------------------------------------------


class SagaStepInline(ReadOnlyInline):
    model = SagaStep
    fields = [
        "name",
        "kind",
        "service",
        "state",
        "attempts",
        "compensation_attempts",
        "confirm_attempts",
        "next_attempt_at",
        "deadline_at",
        "error",
    ]
    readonly_fields = fields


class SagaEventInline(ReadOnlyInline):
    model = SagaEvent
    fields = ["seq", "created_at", "kind", "step", "from_state", "to_state", "actor", "data"]
    readonly_fields = fields
    ordering = ["seq"]


@admin.register(Saga)
class SagaAdmin(admin.ModelAdmin):
    """View-only: a saga changes through the engine alone (a saved form would write a stale row
    over the engine's), so the only way to act on one is an action."""

    list_display = ["short", "order", "style", "state", "created_at", "finished_at", "failure_code", "operator_actions"]
    list_display_links = ["short"]
    list_filter = ["state", StyleFilter, age_filter(), AttentionFilter, "definition"]
    search_fields = ["id", "context__order_id"]
    readonly_fields = [
        "id",
        "order",
        "definition",
        "definition_label",
        "definition_hash",
        "style",
        "state",
        "operator_actions",
        "context",
        "failure",
        "version",
        "deadline_at",
        "created_at",
        "updated_at",
        "finished_at",
    ]
    fields = readonly_fields
    inlines = [SagaStepInline, SagaEventInline]
    actions = [retry_sagas, skip_parked_compensations, cancel_sagas]
    date_hierarchy = "created_at"

    def get_queryset(self, request):
        # The steps come along for the operator-actions column and the guards (one query).
        return selectors.saga_list().annotate(db_now=Now()).prefetch_related("steps")

    def has_add_permission(self, request) -> bool:
        return False  # sagas start from orders, never by hand

    def has_change_permission(self, request, obj=None) -> bool:
        return False

    def has_delete_permission(self, request, obj=None) -> bool:
        return False

    def has_operate_permission(self, request) -> bool:
        return request.user.has_perm(OPERATE)

    @admin.display(description="saga", ordering="id")
    def short(self, saga: Saga) -> str:
        return short_id(saga.id)

    @admin.display(description="failure")
    def failure_code(self, saga: Saga) -> str:
        return (saga.failure or {}).get("code", "-")

    @admin.display(description="order")
    def order(self, saga: Saga) -> str:
        return order_link((saga.context or {}).get("order_id"))

    @admin.display(description="style")
    def style(self, saga: Saga) -> str:
        return style_of(saga)

    @admin.display(description="operator actions")
    def operator_actions(self, saga: Saga) -> str:
        """What the state machine allows an operator to do with this saga now."""
        allowed = [
            name
            for name, refusal in (("retry", retry_refusal), ("skip", skip_refusal), ("cancel", cancel_refusal))
            if refusal(saga) is None
        ]
        return ", ".join(allowed) or "-"


@admin.register(SagaStep)
class SagaStepAdmin(ReadOnlyAdminMixin, admin.ModelAdmin):
    """Steps across sagas: which ones are retrying, parked or past their lease, per service."""

    list_display = [
        "name",
        "saga_ref",
        "service",
        "state",
        "attempts",
        "compensation_attempts",
        "next_attempt_at",
        "deadline_at",
    ]
    list_filter = ["state", "service", "name", "kind", age_filter("started_at", "started")]
    search_fields = ["saga__id", "name", "saga__context__order_id"]
    list_select_related = ["saga"]

    @admin.display(description="saga", ordering="saga_id")
    def saga_ref(self, step: SagaStep) -> str:
        return saga_link(step.saga_id)


@admin.register(DefinitionSnapshot)
class DefinitionSnapshotAdmin(ReadOnlyAdminMixin, admin.ModelAdmin):
    """The definition versions sagas started on (written by the engine, never changed)."""

    list_display = ["name", "version", "short_digest", "created_at"]
    list_filter = ["name"]
    search_fields = ["digest", "name"]
    ordering = ["name", "created_at"]

    @admin.display(description="digest", ordering="digest")
    def short_digest(self, snapshot: DefinitionSnapshot) -> str:
        return snapshot.digest[:12]


@admin.register(SagaEvent)
class SagaEventAdmin(ReadOnlyAdminMixin, admin.ModelAdmin):
    list_display = ["created_at", "saga_ref", "seq", "kind", "step", "from_state", "to_state", "actor", "reason"]
    list_filter = ["kind", "actor", age_filter()]
    search_fields = ["saga__id", "step", "actor", "saga__context__order_id"]
    list_select_related = ["saga"]
    ordering = ["-created_at", "-seq"]

    @admin.display(description="saga", ordering="saga_id")
    def saga_ref(self, event: SagaEvent) -> str:
        return saga_link(event.saga_id)

    @admin.display(description="reason")
    def reason(self, event: SagaEvent) -> str:
        return (event.data or {}).get("reason", "")


class AlertOpenFilter(admin.SimpleListFilter):
    title = "status"
    parameter_name = "open"

    def lookups(self, request, model_admin):
        return [("yes", "open"), ("no", "resolved")]

    def queryset(self, request, queryset):
        if self.value() in ("yes", "no"):
            return queryset.filter(resolved_at__isnull=self.value() == "yes")
        return queryset


@admin.action(description="Resolve the selected alerts", permissions=["operate"])
def resolve_alerts(modeladmin, request, queryset):
    """Mark alerts seen and handled. The saga itself is untouched: retry, skip or cancel it for
    that. Conditional on still being open, so two operators never both resolve one alert."""
    open_ids = list(queryset.filter(resolved_at__isnull=True).values_list("id", flat=True))
    for alert_id in queryset.exclude(id__in=open_ids).values_list("id", flat=True):
        modeladmin.message_user(request, f"Alert {alert_id}: already resolved", messages.WARNING)
    resolved = (
        Alert.objects.using(DB)
        .filter(id__in=open_ids, resolved_at__isnull=True)
        .update(resolved_at=db_now(DB), resolved_by=operator_actor(request.user))
    )
    if resolved:
        modeladmin.message_user(request, f"{resolved} alert(s) resolved.", messages.SUCCESS)


@admin.register(Alert)
class AlertAdmin(ReadOnlyAdminMixin, admin.ModelAdmin):
    list_display = ["created_at", "kind", "saga_ref", "saga_state", "message", "resolved_at", "resolved_by"]
    list_filter = [AlertOpenFilter, "kind", age_filter()]
    search_fields = ["saga__id", "message", "saga__context__order_id"]
    list_select_related = ["saga"]
    actions = [resolve_alerts]

    def has_operate_permission(self, request) -> bool:
        return request.user.has_perm(OPERATE)

    @admin.display(description="saga", ordering="saga_id")
    def saga_ref(self, alert: Alert) -> str:
        return saga_link(alert.saga_id)

    @admin.display(description="saga state")
    def saga_state(self, alert: Alert) -> str:
        if alert.saga is None:
            return "-"  # a dead letter: no saga could be read from it
        return format_html("<b>{}</b>", alert.saga.state) if alert.saga.state == Saga.State.PARKED else alert.saga.state


@admin.register(SavedView)
class SavedViewAdmin(admin.ModelAdmin):
    """Operators' saved dashboard views (each their own; made on the dashboard)."""

    list_display = ["name", "user", "query", "created_at"]
    list_filter = ["user"]
    search_fields = ["name", "query", "user__username"]
    raw_id_fields = ["user"]


# Alert channels, groups and deliveries; the circuit breakers (a page with no model).
from . import alerting_admin, breakers_admin  # noqa: E402, F401
