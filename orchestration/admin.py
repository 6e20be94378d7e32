"""Admin for sagas: read-only history, and the operator actions (retry, skip) with a reason."""

from __future__ import annotations

from django import forms
from django.contrib import admin, messages
from django.shortcuts import render

from . import engine
from .exceptions import OperationNotAllowed
from .models import Alert, Saga, SagaEvent, SagaStep
from .permissions import OPERATE


class ReasonForm(forms.Form):
    reason = forms.CharField(max_length=500, widget=forms.Textarea(attrs={"rows": 3, "cols": 60}))


def _with_reason(modeladmin, request, queryset, *, title: str, apply):
    """Ask for a reason on an intermediate page, then apply the action to each saga."""
    form = ReasonForm(request.POST if "apply" in request.POST else None)
    if form.is_valid():
        actor = f"user:{request.user.get_username()}"
        for saga in queryset:
            try:
                apply(saga, actor, form.cleaned_data["reason"])
                modeladmin.message_user(request, f"{saga.id}: done", messages.SUCCESS)
            except OperationNotAllowed as exc:
                modeladmin.message_user(request, f"{saga.id}: {exc.message}", messages.ERROR)
        return None
    context = {
        **modeladmin.admin_site.each_context(request),
        "title": title,
        "queryset": queryset,
        "form": form,
        "action": request.POST["action"],
        "opts": modeladmin.model._meta,
    }
    return render(request, "admin/orchestration/saga/reason.html", context)


@admin.action(description="Retry the selected parked or stuck sagas", permissions=["operate"])
def retry_sagas(modeladmin, request, queryset):
    return _with_reason(
        modeladmin,
        request,
        queryset,
        title="Retry sagas",
        apply=lambda saga, actor, reason: engine.saga_retry(saga_id=saga.id, actor=actor, reason=reason),
    )


@admin.action(description="Skip the parked compensations of the selected sagas", permissions=["operate"])
def skip_parked_compensations(modeladmin, request, queryset):
    def skip(saga, actor, reason):
        parked = saga.steps.filter(state=SagaStep.State.COMPENSATION_FAILED).values_list("name", flat=True)
        if not parked:
            raise OperationNotAllowed("nothing_to_skip", "no parked compensation")
        for name in parked:
            engine.saga_skip(saga_id=saga.id, step_name=name, actor=actor, reason=reason)

    return _with_reason(modeladmin, request, queryset, title="Skip parked compensations", apply=skip)


class ReadOnlyInline(admin.TabularInline):
    extra = 0
    can_delete = False

    def has_add_permission(self, request, obj=None) -> bool:
        return False

    def has_change_permission(self, request, obj=None) -> bool:
        return False


class SagaStepInline(ReadOnlyInline):
    model = SagaStep
    fields = ["name", "kind", "service", "state", "attempts", "compensation_attempts", "deadline_at", "error"]
    readonly_fields = fields


class SagaEventInline(ReadOnlyInline):
    model = SagaEvent
    fields = ["seq", "created_at", "kind", "step", "from_state", "to_state", "actor", "data"]
    readonly_fields = fields
    ordering = ["seq"]


@admin.register(Saga)
class SagaAdmin(admin.ModelAdmin):
    list_display = ["id", "definition", "state", "created_at", "finished_at", "version"]
    list_filter = ["state", "definition", "created_at"]
    search_fields = ["id", "context__order_id"]
    readonly_fields = [
        "id",
        "definition",
        "state",
        "context",
        "failure",
        "version",
        "deadline_at",
        "created_at",
        "finished_at",
    ]
    inlines = [SagaStepInline, SagaEventInline]
    actions = [retry_sagas, skip_parked_compensations]
    date_hierarchy = "created_at"

    def has_add_permission(self, request) -> bool:
        return False  # sagas start from orders, never by hand

    def has_operate_permission(self, request) -> bool:
        return request.user.has_perm(OPERATE)

    def has_delete_permission(self, request, obj=None) -> bool:
        return False


@admin.register(Alert)
class AlertAdmin(admin.ModelAdmin):
    list_display = ["created_at", "kind", "saga", "message", "resolved_at", "resolved_by"]
    list_filter = ["kind", ("resolved_at", admin.EmptyFieldListFilter)]
    readonly_fields = ["saga", "kind", "message", "created_at", "resolved_at", "resolved_by"]

    def has_add_permission(self, request) -> bool:
        return False
