"""Admin for stock and reservations.

Stock is the one thing an operator edits here (a delivery arrived, a count was wrong), and it
is contended: sagas reserve from it all the time. The form carries the version the row was
loaded at, and saving is `services.stock_adjust`'s conditional UPDATE, so a change made in the
meantime (a reservation, another operator) turns the save into a form error, with nothing
written. Reservations move only with their saga: read-only.
"""

from __future__ import annotations

from django import forms
from django.contrib import admin
from django.core.exceptions import ValidationError
from django.db.models import F

from sagaplatform.kernel.admin import ReadOnlyAdminMixin, age_filter, order_link, saga_link, short_id

from . import services
from .exceptions import InsufficientStock, StockContention, UnknownSku
from .models import Reservation, StockItem


class StockItemForm(forms.ModelForm):
    loaded_version = forms.IntegerField(widget=forms.HiddenInput, required=False)

    class Meta:
        model = StockItem
        fields = ["sku", "on_hand"]

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        if self.instance.pk:
            self.fields["loaded_version"].initial = self.instance.version
            self.fields["loaded_version"].required = True

    def clean(self):
        cleaned = super().clean()
        if not self.instance.pk or self.errors:
            return cleaned
        # The conditional UPDATE is the check, so it runs here, where a refusal can still be a
        # form error; the admin's save then writes nothing more (see `StockItemAdmin.save_model`).
        try:
            adjusted = services.stock_adjust(
                sku=self.instance.sku, on_hand=cleaned["on_hand"], expected_version=cleaned["loaded_version"]
            )
        except StockContention as exc:
            raise ValidationError(
                "This stock changed while you were editing it (version %(loaded)s, now %(now)s): "
                "nothing was saved. Reload the page to see the current figures, then edit again.",
                code="stock_version_conflict",
                params={"loaded": exc.details["expected_version"], "now": exc.details["version"]},
            ) from exc
        except InsufficientStock as exc:
            self.add_error("on_hand", ValidationError(exc.message, code="stock_below_reserved"))
        except UnknownSku as exc:
            raise ValidationError(exc.message, code="unknown_sku") from exc
        else:
            self.instance.version, self.instance.reserved = adjusted.version, adjusted.reserved
        return cleaned


class AvailabilityFilter(admin.SimpleListFilter):
    title = "availability"
    parameter_name = "availability"

    def lookups(self, request, model_admin):
        return [("out", "none available"), ("reserved", "some reserved"), ("free", "nothing reserved")]

    def queryset(self, request, queryset):
        if self.value() == "out":
            return queryset.filter(on_hand__lte=F("reserved"))
        if self.value() == "reserved":
            return queryset.filter(reserved__gt=0)
        if self.value() == "free":
            return queryset.filter(reserved=0)
        return queryset


@admin.register(StockItem)
class StockItemAdmin(admin.ModelAdmin):
    form = StockItemForm
    list_display = ["sku", "on_hand", "reserved", "available", "version", "updated_at"]
    list_filter = [AvailabilityFilter, age_filter("updated_at", "last changed")]
    search_fields = ["sku"]
    fields = ["sku", "on_hand", "loaded_version", "reserved", "available", "version", "updated_at"]

    def get_readonly_fields(self, request, obj=None):
        readonly = ["reserved", "available", "version", "updated_at"]
        return ["sku", *readonly] if obj else readonly

    def get_fields(self, request, obj=None):
        # A new SKU starts with nothing reserved at version 0: only its name and count are asked.
        return self.fields if obj else ["sku", "on_hand"]

    def save_model(self, request, obj, form, change) -> None:
        if not change:
            obj.save(using=services.DB)
        # A change was written by the form's conditional UPDATE: saving the instance again
        # would be the unguarded read-modify-write the version exists to prevent.

    def has_delete_permission(self, request, obj=None) -> bool:
        return False  # reservations and orders name the SKU


@admin.register(Reservation)
class ReservationAdmin(ReadOnlyAdminMixin, admin.ModelAdmin):
    list_display = ["short", "sku", "quantity", "state", "order", "saga", "lock_conflicts", "created_at", "updated_at"]
    list_filter = ["state", "sku", age_filter()]
    search_fields = ["sku", "order_id", "saga_id"]

    @admin.display(description="reservation", ordering="id")
    def short(self, obj: Reservation) -> str:
        return short_id(obj.id)

    @admin.display(description="order", ordering="order_id")
    def order(self, obj: Reservation) -> str:
        return order_link(obj.order_id)

    @admin.display(description="saga", ordering="saga_id")
    def saga(self, obj: Reservation) -> str:
        return saga_link(obj.saga_id)
