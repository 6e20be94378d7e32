"""Admin for charges and the ledger: read-only. Money moves only with a saga's steps (capture,
refund, void), each guarded by the barrier; a hand edit here would break the ledger's balance
that `manage.py audit` checks."""

from __future__ import annotations

from django.contrib import admin

from sagaplatform.kernel.admin import (
    ReadOnlyAdminMixin,
    ReadOnlyInline,
    age_filter,
    money,
    order_link,
    saga_link,
    short_id,
)

from .models import Charge, LedgerEntry, PaymentMethod


class LedgerEntryInline(ReadOnlyInline):
    model = LedgerEntry
    fields = ["created_at", "kind", "amount"]
    readonly_fields = fields


@admin.register(Charge)
class ChargeAdmin(ReadOnlyAdminMixin, admin.ModelAdmin):
    list_display = [
        "short",
        "amount_display",
        "state",
        "order",
        "saga",
        "gateway_reference",
        "created_at",
        "updated_at",
    ]
    list_filter = ["state", "currency", age_filter()]
    search_fields = ["id", "order_id", "saga_id", "gateway_reference"]
    inlines = [LedgerEntryInline]
    exclude = ["payment_token"]  # a card token, kept only while its charge is pending

    @admin.display(description="charge", ordering="id")
    def short(self, charge: Charge) -> str:
        return short_id(charge.id)

    @admin.display(description="amount", ordering="amount")
    def amount_display(self, charge: Charge) -> str:
        return money(charge.amount, charge.currency)

    @admin.display(description="order", ordering="order_id")
    def order(self, charge: Charge) -> str:
        return order_link(charge.order_id)

    @admin.display(description="saga", ordering="saga_id")
    def saga(self, charge: Charge) -> str:
        return saga_link(charge.saga_id)


@admin.register(LedgerEntry)
class LedgerEntryAdmin(ReadOnlyAdminMixin, admin.ModelAdmin):
    list_display = ["created_at", "kind", "amount_display", "charge", "order", "saga"]
    list_filter = ["kind", "charge__currency", age_filter()]
    search_fields = ["charge__order_id", "charge__saga_id", "charge__gateway_reference"]
    list_select_related = ["charge"]

    @admin.display(description="amount", ordering="amount")
    def amount_display(self, entry: LedgerEntry) -> str:
        return money(entry.amount, entry.charge.currency)

    @admin.display(description="order")
    def order(self, entry: LedgerEntry) -> str:
        return order_link(entry.charge.order_id)

    @admin.display(description="saga")
    def saga(self, entry: LedgerEntry) -> str:
        return saga_link(entry.charge.saga_id)


@admin.register(PaymentMethod)
class PaymentMethodAdmin(ReadOnlyAdminMixin, admin.ModelAdmin):
    """The cards registered by orders, by reference. The token itself is never shown."""

    list_display = ["reference", "order", "registered", "registered_at", "awaited_at"]
    search_fields = ["reference", "order_id"]
    exclude = ["token"]

    @admin.display(description="order", ordering="order_id")
    def order(self, method: PaymentMethod) -> str:
        return order_link(method.order_id) if method.order_id else "-"

    @admin.display(description="registered", boolean=True)
    def registered(self, method: PaymentMethod) -> bool:
        return bool(method.token)
