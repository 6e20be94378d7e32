"""Admin for alert delivery: channels (operators only; a webhook's secret is write-only and shown
masked), and the alert groups with each delivery and its state (read-only)."""

from __future__ import annotations

from django import forms
from django.contrib import admin
from django.core.exceptions import ValidationError

from sagaplatform.kernel.admin import ReadOnlyAdminMixin, ReadOnlyInline

from . import alerting
from .alerting_models import new_signing_secret
from .models import AlertChannel, AlertDelivery, AlertGroup
from .permissions import OPERATE


class AlertChannelForm(forms.ModelForm):
    new_secret = forms.CharField(
        required=False,
        label="Signing secret",
        widget=forms.PasswordInput(render_value=False),
        help_text="Webhooks only: whsec_ and base64 (24 bytes or more). Empty: keep the current one, "
        "or generate one for a new webhook.",
    )
    min_severity = forms.ChoiceField(choices=[(s, s) for s in alerting.SEVERITIES], initial="warning")

    class Meta:
        model = AlertChannel
        fields = ["name", "kind", "target", "min_severity", "enabled"]

    def clean_name(self):
        name = self.cleaned_data["name"]
        if name.startswith("env-") and (self.instance.pk is None or self.instance.source != "env"):
            raise ValidationError("Names starting with env- are kept for the environment's channels.")
        return name

    def clean_new_secret(self):
        secret = self.cleaned_data.get("new_secret", "")
        return alerting.validate_secret(secret) if secret else ""

    def clean(self):
        super().clean()
        cleaned = self.cleaned_data  # what ModelForm.clean() returns
        kind, target = cleaned.get("kind"), cleaned.get("target")
        if kind and target is not None:
            try:
                cleaned["target"] = alerting.validate_target(kind, target)
            except ValidationError as error:
                self.add_error("target", error)
        if kind != AlertChannel.Kind.WEBHOOK and cleaned.get("new_secret"):
            self.add_error("new_secret", "Only a webhook has a signing secret.")
        return cleaned

    def save(self, commit=True):
        channel = super().save(commit=False)
        if self.cleaned_data.get("new_secret"):
            channel.secret = self.cleaned_data["new_secret"]
        elif channel.kind == AlertChannel.Kind.WEBHOOK and not channel.secret:
            channel.secret = new_signing_secret()
        if commit:
            channel.save()
        return channel


class OperatorsOnly:
    """Alert configuration and history: staff with the operate permission (superusers have it)."""

    def has_module_permission(self, request) -> bool:
        return request.user.is_staff and request.user.has_perm(OPERATE)

    def has_view_permission(self, request, obj=None) -> bool:
        return self.has_module_permission(request)


@admin.register(AlertChannel)
class AlertChannelAdmin(OperatorsOnly, admin.ModelAdmin):
    form = AlertChannelForm
    list_display = ("name", "kind", "target", "secret_hint", "min_severity", "enabled", "source")
    list_filter = ("kind", "enabled", "source")
    readonly_fields = ("secret_hint", "source")

    @admin.display(description="secret")
    def secret_hint(self, obj) -> str:
        return obj.masked_secret or "-"

    def has_add_permission(self, request) -> bool:
        return self.has_module_permission(request)

    def has_change_permission(self, request, obj=None) -> bool:
        return self.has_module_permission(request)

    def has_delete_permission(self, request, obj=None) -> bool:
        return self.has_module_permission(request)


class AlertDeliveryInline(ReadOnlyInline):
    model = AlertDelivery
    fields = ("webhook_id", "channel", "status", "state", "attempts", "last_status_code", "last_error", "created_at")
    readonly_fields = fields


@admin.register(AlertGroup)
class AlertGroupAdmin(OperatorsOnly, ReadOnlyAdminMixin, admin.ModelAdmin):
    list_display = ("rule", "severity", "status", "count", "summary", "started_at", "resolved_at", "deliveries_state")
    list_filter = ("status", "severity", "rule")
    search_fields = ("summary", "key")
    inlines = [AlertDeliveryInline]

    @admin.display(description="deliveries")
    def deliveries_state(self, obj) -> str:
        states = [d.state for d in obj.deliveries.all()]
        return ", ".join(f"{states.count(s)} {s}" for s in dict.fromkeys(states)) or "-"

    def get_queryset(self, request):
        return super().get_queryset(request).prefetch_related("deliveries")


@admin.register(AlertDelivery)
class AlertDeliveryAdmin(OperatorsOnly, ReadOnlyAdminMixin, admin.ModelAdmin):
    list_display = ("webhook_id", "group", "channel", "status", "state", "attempts", "last_status_code", "created_at")
    list_filter = ("state", "status", "channel")
    list_select_related = ("group", "channel")
