"""Admin for the kernel's tables (barrier, outbox, fault rules), and the admin helpers every app shares.

The kernel's tables exist in every database, and the router cannot guess which one a query means
(`ServiceRouter` sends kernel models to the alias the caller names). So these admins read the
alias from a "database" list filter that has no "All" choice (one changelist cannot span two
databases); Django's preserved filters carry it into the change, add and delete pages.

The shared helpers live here because the kernel is the one module every service and the
orchestrator may import: read-only admins for logs and ledgers, an age filter, links by URL
between apps on different databases, and operator actions that ask for a reason first.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from django import forms
from django.conf import settings
from django.contrib import admin, messages
from django.db.models import BooleanField, ExpressionWrapper, Q, QuerySet
from django.db.models.functions import Now
from django.http import HttpRequest, HttpResponse, QueryDict
from django.shortcuts import render
from django.urls import NoReverseMatch, reverse
from django.utils.html import format_html

from sagaplatform.api import operator_actor

from . import faults
from .clock import db_now
from .models import Barrier, DeadLetter, FaultRule, OutboxMessage, ServiceInstance

# --- Shared helpers ---------------------------------------------------------------------------


def short_id(value: object) -> str:
    """A UUID's last 8 characters, the whole of it on hover: lists stay readable, and the
    search still takes the whole id. The last, as the first are the key's creation time
    (kernel/ids.py), the same for every id of one minute."""
    if value in (None, ""):
        return "-"
    text = str(value)
    return format_html('<span title="{}">{}</span>', text, text[-8:]) if len(text) == 36 else text


def admin_link(viewname: str, pk: object, text: str | None = None) -> str:
    """A link to another admin page by URL: rows in different databases have no foreign key."""
    if pk in (None, ""):
        return "-"
    try:
        url = reverse(viewname, args=[pk])
    except NoReverseMatch:
        return text or short_id(pk)
    return format_html('<a href="{}">{}</a>', url, text or short_id(pk))


def order_link(order_id: object) -> str:
    return admin_link("admin:orders_order_change", order_id)


def saga_link(saga_id: object) -> str:
    return admin_link("admin:orchestration_saga_change", saga_id)


def money(amount: object, currency: str) -> str:
    return f"{amount} {currency}"


class ReadOnlyAdminMixin:
    """For append-only history (event logs, ledgers, barrier, outbox) and rows only a saga may
    change: listable and searchable, never added, edited or deleted by hand."""

    def has_add_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False

    def has_delete_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False


class ReadOnlyInline(ReadOnlyAdminMixin, admin.TabularInline[Any, Any]):
    extra = 0
    can_delete = False
    show_change_link = False


AGES = (
    ("5m", "in the last 5 minutes", timedelta(minutes=5)),
    ("1h", "in the last hour", timedelta(hours=1)),
    ("1d", "in the last day", timedelta(days=1)),
)


def age_filter(field: str = "created_at", title: str = "age") -> type[admin.SimpleListFilter]:
    """A list filter on how long ago `field` was set, measured with the database's clock."""

    class AgeFilter(admin.SimpleListFilter):
        parameter_name = f"{field}_age"

        def lookups(self, request: HttpRequest, model_admin: Any) -> list[tuple[str, str]]:
            return [(key, label) for key, label, _ in AGES] + [("older", "more than a day ago")]

        def queryset(self, request: HttpRequest, queryset: QuerySet[Any]) -> QuerySet[Any]:
            value = self.value()
            if value is None:
                return queryset
            now = db_now(queryset.db)
            if value == "older":
                return queryset.filter(**{f"{field}__lt": now - AGES[-1][2]})
            span = next((span for key, _, span in AGES if key == value), None)
            return queryset if span is None else queryset.filter(**{f"{field}__gte": now - span})

    AgeFilter.title = title
    return AgeFilter


# --- Operator actions with a reason ------------------------------------------------------------


class ActionRefused(Exception):
    """A row the action may not touch; the message says why, in words an operator can act on."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class ReasonForm(forms.Form):
    reason = forms.CharField(
        max_length=500,
        widget=forms.Textarea(attrs={"rows": 3, "cols": 60}),
        help_text="Recorded with your name and the time in the history of every row it acts on.",
    )


@dataclass
class _Row:
    obj: Any
    refusal: str | None


def action_with_reason(
    modeladmin: admin.ModelAdmin[Any],
    request: HttpRequest,
    queryset: QuerySet[Any],
    *,
    title: str,
    guard: Callable[[Any], str | None],
    apply: Callable[[Any, str, str], object],
    done: str,
) -> HttpResponse | None:
    """Ask for a reason on an intermediate page, then apply the action row by row.

    `guard(obj)` returns why a row may not be acted on (the state machine refuses it), or None;
    refused rows are listed on the reason page and reported, never passed to `apply`.
    `apply(obj, actor, reason)` goes through the service or engine, which decides again under
    its own lock and may still refuse by raising `ActionRefused`.
    """
    rows = [_Row(obj, guard(obj)) for obj in queryset]
    form = ReasonForm(request.POST if "apply" in request.POST else None)
    if not form.is_valid():
        context = {
            **modeladmin.admin_site.each_context(request),
            "title": title,
            "rows": rows,
            "actionable": sum(1 for row in rows if row.refusal is None),
            "form": form,
            "action": request.POST["action"],
            "opts": modeladmin.model._meta,
        }
        return render(request, "admin/action_reason.html", context)

    actor, reason = operator_actor(request.user), form.cleaned_data["reason"]
    opts = modeladmin.model._meta
    left_alone: dict[str, list[str]] = {}
    succeeded = 0
    for row in rows:
        if row.refusal is not None:
            left_alone.setdefault(row.refusal, []).append(str(row.obj.pk))
            continue
        try:
            apply(row.obj, actor, reason)
        except ActionRefused as exc:
            modeladmin.message_user(
                request, f"{opts.verbose_name} {row.obj.pk}: refused: {exc.message}", messages.ERROR
            )
        else:
            succeeded += 1
    # One line per reason the state machine gave, however many rows it concerned.
    for refusal, pks in left_alone.items():
        name = opts.verbose_name if len(pks) == 1 else opts.verbose_name_plural
        modeladmin.message_user(
            request, f"{len(pks)} {name} left alone ({refusal}): {', '.join(pks)}", messages.WARNING
        )
    if succeeded:
        name = opts.verbose_name if succeeded == 1 else opts.verbose_name_plural
        modeladmin.message_user(request, f"{succeeded} {name} {done}.", messages.SUCCESS)
    return None


# --- One admin over several databases -----------------------------------------------------------

DATABASE_PARAM = "db"


def selected_alias(request: HttpRequest, aliases: Iterable[str]) -> str:
    """The alias the "database" filter names: in the changelist's own query string, or, on the
    change, add and delete pages, in the preserved `_changelist_filters`. The first alias when
    none (or an unknown one) is named."""
    aliases = list(aliases)
    value = request.GET.get(DATABASE_PARAM)
    if value is None:
        value = QueryDict(request.GET.get("_changelist_filters", "")).get(DATABASE_PARAM)
    return value if value in aliases else aliases[0]


class DatabaseFilter(admin.SimpleListFilter):
    """Which database to list. No "All": a changelist is one query on one database."""

    title = "database"
    parameter_name = DATABASE_PARAM

    def __init__(self, request: HttpRequest, params: dict[str, Any], model: Any, model_admin: Any) -> None:
        super().__init__(request, params, model, model_admin)
        self.current = selected_alias(request, model_admin.database_aliases)

    def lookups(self, request: HttpRequest, model_admin: Any) -> list[tuple[str, str]]:
        return [(alias, alias) for alias in model_admin.database_aliases]

    def queryset(self, request: HttpRequest, queryset: QuerySet[Any]) -> QuerySet[Any]:
        return queryset  # `PerDatabaseAdmin.get_queryset` already chose the database

    def choices(self, changelist: Any) -> Iterator[Any]:
        for alias, label in self.lookup_choices:
            yield {
                "selected": alias == self.current,
                "query_string": changelist.get_query_string({self.parameter_name: alias}),
                "display": label,
            }


class PerDatabaseAdmin(admin.ModelAdmin[Any]):
    """A model whose table exists in several databases; the "database" filter picks one."""

    database_aliases: tuple[str, ...] = tuple(settings.DATABASE_ALIASES)

    def alias(self, request: HttpRequest) -> str:
        return selected_alias(request, self.database_aliases)

    def get_queryset(self, request: HttpRequest) -> QuerySet[Any]:
        return super().get_queryset(request).using(self.alias(request))

    def get_list_filter(self, request: HttpRequest) -> Any:
        return [DatabaseFilter, *super().get_list_filter(request)]

    def changelist_view(self, request: HttpRequest, extra_context: dict[str, Any] | None = None) -> HttpResponse:
        extra_context = {**(extra_context or {}), "subtitle": f"Database: {self.alias(request)}"}
        return super().changelist_view(request, extra_context)

    def save_model(self, request: HttpRequest, obj: Any, form: Any, change: bool) -> None:
        obj.save(using=obj._state.db or self.alias(request))

    def delete_model(self, request: HttpRequest, obj: Any) -> None:
        obj.delete(using=obj._state.db or self.alias(request))


@admin.register(Barrier)
class BarrierAdmin(ReadOnlyAdminMixin, PerDatabaseAdmin):
    database_aliases = tuple(settings.SERVICE_ALIASES)
    list_display = ["step", "op", "saga", "outcome_status", "created_at"]
    list_filter = ["op", "step", age_filter()]
    search_fields = ["saga_id", "step"]

    @admin.display(description="saga", ordering="saga_id")
    def saga(self, obj: Barrier) -> str:
        return saga_link(obj.saga_id)

    @admin.display(description="outcome")
    def outcome_status(self, obj: Barrier) -> str:
        outcome = obj.outcome or {}
        return outcome.get("status") or outcome.get("barrier") or "-"


class PublishedFilter(admin.SimpleListFilter):
    title = "published"
    parameter_name = "published"

    def lookups(self, request: HttpRequest, model_admin: Any) -> list[tuple[str, str]]:
        return [("yes", "published"), ("no", "waiting for the relay")]

    def queryset(self, request: HttpRequest, queryset: QuerySet[Any]) -> QuerySet[Any]:
        if self.value() in ("yes", "no"):
            return queryset.filter(published_at__isnull=self.value() == "no")
        return queryset


@admin.register(OutboxMessage)
class OutboxMessageAdmin(ReadOnlyAdminMixin, PerDatabaseAdmin):
    list_display = ["short", "task", "queue", "saga", "created_at", "available_at", "published_at", "publish_attempts"]
    list_filter = [PublishedFilter, "queue", "task", age_filter()]
    search_fields = ["id", "task", "payload__saga_id", "payload__order_id"]

    @admin.display(description="message", ordering="id")
    def short(self, obj: OutboxMessage) -> str:
        return short_id(obj.id)

    @admin.display(description="saga")
    def saga(self, obj: OutboxMessage) -> str:
        return saga_link((obj.payload or {}).get("saga_id"))


class FaultRuleForm(forms.ModelForm[FaultRule]):
    # The same bounds as the fault API: a typo must not hang a worker for an hour.
    failure_rate = forms.FloatField(min_value=0.0, max_value=1.0, initial=0.0)
    hang_seconds = forms.FloatField(min_value=0.0, max_value=600.0, initial=0.0)
    latency_ms = forms.IntegerField(min_value=0, max_value=60_000, initial=0)

    class Meta:
        model = FaultRule
        fields = [
            "operation",
            "failure_rate",
            "fail_first",
            "latency_ms",
            "hang_seconds",
            "crash_point",
            "crashes_left",
            "is_enabled",
        ]


@admin.register(FaultRule)
class FaultRuleAdmin(PerDatabaseAdmin):
    """Fault rules are read by each service from its own database, for its own name: a rule's
    service is the database it is listed in, so it is set from the filter, never typed."""

    database_aliases = tuple(settings.SERVICE_ALIASES)
    form = FaultRuleForm
    list_display = [
        "id",
        "service",
        "operation",
        "failure_rate",
        "fail_first",
        "latency_ms",
        "crash_point",
        "is_enabled",
    ]
    list_filter = ["is_enabled", "operation", "crash_point"]
    list_editable = ["is_enabled"]
    search_fields = ["operation"]
    readonly_fields = ["service", "created_at"]

    # Off, and gone from the index, unless SAGA_FAULT_INJECTION is on (by default only with DEBUG).
    def has_view_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return settings.SAGA_FAULT_INJECTION and super().has_view_permission(request, obj)

    def has_add_permission(self, request: HttpRequest) -> bool:
        return settings.SAGA_FAULT_INJECTION and super().has_add_permission(request)

    def has_change_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return settings.SAGA_FAULT_INJECTION and super().has_change_permission(request, obj)

    def has_delete_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return settings.SAGA_FAULT_INJECTION and super().has_delete_permission(request, obj)

    def save_model(self, request: HttpRequest, obj: Any, form: Any, change: bool) -> None:
        if not change:
            obj.service = self.alias(request)
        obj.save(using=obj.service)
        faults.clear_cache()

    def delete_model(self, request: HttpRequest, obj: Any) -> None:
        super().delete_model(request, obj)
        faults.clear_cache()

    def delete_queryset(self, request: HttpRequest, queryset: QuerySet[Any]) -> None:
        super().delete_queryset(request, queryset)
        faults.clear_cache()


@admin.register(DeadLetter)
class DeadLetterAdmin(ReadOnlyAdminMixin, PerDatabaseAdmin):
    """Messages a worker recorded and acknowledged instead of running: each database holds the
    ones that came in on its queue (the orchestrator's in `default`)."""

    list_display = ["id", "created_at", "queue", "reason", "task", "size", "alerted_at"]
    list_filter = ["reason", "queue", age_filter()]
    search_fields = ["task", "message_id", "error"]
    fields = ["queue", "reason", "task", "message_id", "size", "error", "body", "created_at", "alerted_at"]


class InstanceAliveFilter(admin.SimpleListFilter):
    title = "alive"
    parameter_name = "alive"

    def lookups(self, request: HttpRequest, model_admin: Any) -> list[tuple[str, str]]:
        return [("yes", "live"), ("no", "expired")]

    def queryset(self, request: HttpRequest, queryset: QuerySet[Any]) -> QuerySet[Any]:
        now = db_now("default")
        if self.value() == "yes":
            return queryset.filter(expires_at__gt=now)
        if self.value() == "no":
            return queryset.filter(expires_at__lte=now)
        return queryset


@admin.register(ServiceInstance)
class ServiceInstanceAdmin(ReadOnlyAdminMixin, admin.ModelAdmin[Any]):
    """The service registry (`sagaplatform/kernel/registry.py`): written by the workers'
    heartbeats only. An expired instance stays listed for SAGA_REGISTRY_FORGET_AFTER."""

    list_display = [
        "service",
        "worker",
        "queue_names",
        "host",
        "pid",
        "code_version",
        "alive",
        "heartbeat_at",
        "tasks_running",
        "oldest_task_age",
    ]
    list_filter = ["service", InstanceAliveFilter]
    search_fields = ["worker", "host", "service"]
    ordering = ["service", "worker"]
    fields = [
        "instance",
        "worker",
        "service",
        "queues",
        "host",
        "pid",
        "code_version",
        "definitions",
        "started_at",
        "heartbeat_at",
        "expires_at",
        "tasks_running",
        "oldest_task_age",
    ]

    def get_queryset(self, request: HttpRequest) -> QuerySet[Any]:
        live = ExpressionWrapper(Q(expires_at__gt=Now()), output_field=BooleanField())
        rows: QuerySet[Any] = super().get_queryset(request).using("default")
        annotated: QuerySet[Any] = rows.annotate(is_alive=live)
        return annotated

    @admin.display(description="queues")
    def queue_names(self, obj: ServiceInstance) -> str:
        return ", ".join(obj.queues or [])  # not the JSON list's repr (["payments"])

    @admin.display(boolean=True, description="alive", ordering="is_alive")
    def alive(self, obj: ServiceInstance) -> bool:
        return bool(getattr(obj, "is_alive", False))
