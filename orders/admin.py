"""Admin for the catalogue, orders and their history.

An order's status belongs to its saga: the saga approves, ships, rejects it. The one operator
transition is cancel, and it goes where a customer's cancel goes: through the saga cancel port,
so the stock is released, the payment refunded and the booking cancelled, and the order ends
`cancelled` when the compensation is done. The order's state machine screens the selection
first (only a pending or approved order can be cancelled); the saga decides the rest (past the
point of no return it refuses, and the row is reported).
"""

from __future__ import annotations

from django.contrib import admin
from django_fsm import can_proceed

from sagaplatform.api import ApiError
from sagaplatform.kernel import ports
from sagaplatform.kernel.admin import (
    ActionRefused,
    ReadOnlyAdminMixin,
    ReadOnlyInline,
    action_with_reason,
    age_filter,
    money,
    order_link,
    saga_link,
    short_id,
)

from . import services
from .models import IdempotencyKey, Order, OrderLine, OrderStatusChange, Product

DEFAULT_CURRENCY = Order._meta.get_field("currency").default


@admin.register(Product)
class ProductAdmin(admin.ModelAdmin):
    list_display = ["sku", "name", "price", "is_active"]
    list_filter = ["is_active"]
    search_fields = ["sku", "name"]

    @admin.display(description="unit price", ordering="unit_price")
    def price(self, product: Product) -> str:
        return money(product.unit_price, DEFAULT_CURRENCY)

    def get_readonly_fields(self, request, obj=None):
        return ["sku"] if obj else []  # orders name products by SKU

    def has_delete_permission(self, request, obj=None) -> bool:
        return False  # orders name products by SKU: deactivate instead


def cancel_refusal(order: Order) -> str | None:
    # A pending order is cancelled directly when its saga compensates; an approved one is
    # revoked first. Anything else has ended (or shipped).
    if can_proceed(order.cancel) or can_proceed(order.revoke):
        return None
    return f"the order is {order.status}; only a pending or approved order can be cancelled"


def _cancel(order: Order, actor: str, reason: str) -> None:
    try:
        services.order_cancel(order=order, actor=actor, reason=reason)
    except ApiError as exc:
        raise ActionRefused(exc.message) from exc


@admin.action(description="Cancel the selected orders (their saga undoes what it did)", permissions=["cancel"])
def cancel_orders(modeladmin, request, queryset):
    return action_with_reason(
        modeladmin,
        request,
        queryset,
        title="Cancel orders",
        guard=cancel_refusal,
        apply=_cancel,
        done="cancelled (the saga is compensating)",
    )


class OrderLineInline(ReadOnlyInline):
    model = OrderLine
    fields = ["sku", "quantity", "unit_price"]
    readonly_fields = fields


class OrderStatusChangeInline(ReadOnlyInline):
    model = OrderStatusChange
    fields = ["created_at", "from_status", "to_status", "reason"]
    readonly_fields = fields


class StyleFilter(admin.SimpleListFilter):
    """The order's transaction style (`mode`), by its short name, as the saga list shows it."""

    title = "style"
    parameter_name = "style"

    def lookups(self, request, model_admin):
        return [(mode, mode) for mode in Order.Mode.values]

    def queryset(self, request, queryset):
        return queryset.filter(mode=self.value()) if self.value() else queryset


class PendingFilter(admin.SimpleListFilter):
    """Orders their saga has not finished with; with the age filter, the ones that look stuck."""

    title = "waiting on its saga"
    parameter_name = "waiting"

    def lookups(self, request, model_admin):
        return [("yes", "pending or approved"), ("no", "ended")]

    def queryset(self, request, queryset):
        open_statuses = [Order.Status.PENDING, Order.Status.APPROVED]
        if self.value() == "yes":
            return queryset.filter(status__in=open_statuses)
        if self.value() == "no":
            return queryset.exclude(status__in=open_statuses)
        return queryset


@admin.register(Order)
class OrderAdmin(admin.ModelAdmin):
    """View-only (a saved form would write over what the saga wrote); cancel is an action."""

    list_display = ["short", "customer", "status", "style", "amount", "created_at", "saga", "next_transitions"]
    list_display_links = ["short"]
    list_filter = ["status", StyleFilter, age_filter(), PendingFilter, "failure_code"]
    search_fields = ["id", "saga_id", "customer_email", "customer_id__exact", "lines__sku"]
    readonly_fields = [
        "id",
        "customer",
        "status",
        "next_transitions",
        "mode",
        "amount",
        "saga",
        "saga_progress",
        "failure_code",
        "failure_message",
        "shipping_address",
        "created_at",
        "updated_at",
        "announced_at",
        "reannounce_at",
    ]
    fields = readonly_fields
    inlines = [OrderLineInline, OrderStatusChangeInline]
    actions = [cancel_orders]
    date_hierarchy = "created_at"

    def has_add_permission(self, request) -> bool:
        return False  # orders come through the API, with their saga

    def has_change_permission(self, request, obj=None) -> bool:
        return False

    def has_delete_permission(self, request, obj=None) -> bool:
        return False

    def has_cancel_permission(self, request) -> bool:
        return request.user.has_perm("orders.change_order")

    @admin.display(description="order", ordering="id")
    def short(self, order: Order) -> str:
        return short_id(order.id)

    @admin.display(description="style", ordering="mode")
    def style(self, order: Order) -> str:
        return order.mode

    @admin.display(description="customer", ordering="customer_email")
    def customer(self, order: Order) -> str:
        return f"{order.customer_email or '-'} (#{order.customer_id})"

    @admin.display(description="total", ordering="total")
    def amount(self, order: Order) -> str:
        return money(order.total, order.currency)

    @admin.display(description="saga")
    def saga(self, order: Order) -> str:
        return saga_link(order.saga_id)

    @admin.display(description="saga progress")
    def saga_progress(self, order: Order) -> str:
        """Read through the kernel port (the saga lives in the orchestrator's database)."""
        summary = ports.saga_summary(order.saga_id)
        if summary is None:
            return "not started yet"
        steps = ", ".join(f"{step['name']}: {step['state']}" for step in summary["steps"])
        return f"{summary['state']} ({steps})"

    @admin.display(description="state machine allows")
    def next_transitions(self, order: Order) -> str:
        """The order's FSM transitions from its status. The saga takes them; an operator only
        cancels (the action)."""
        return ", ".join(t.name for t in order.get_available_status_transitions()) or "-"


@admin.register(OrderStatusChange)
class OrderStatusChangeAdmin(ReadOnlyAdminMixin, admin.ModelAdmin):
    list_display = ["created_at", "order_ref", "from_status", "to_status", "reason"]
    list_filter = ["to_status", "from_status", age_filter()]
    search_fields = ["order__id", "order__saga_id", "reason"]
    list_select_related = ["order"]

    @admin.display(description="order", ordering="order_id")
    def order_ref(self, change: OrderStatusChange) -> str:
        return order_link(change.order_id)


@admin.register(IdempotencyKey)
class IdempotencyKeyAdmin(ReadOnlyAdminMixin, admin.ModelAdmin):
    list_display = ["key", "customer_id", "order_ref", "created_at"]
    list_filter = [age_filter()]
    search_fields = ["key", "order__id", "customer_id__exact"]

    @admin.display(description="order", ordering="order_id")
    def order_ref(self, key: IdempotencyKey) -> str:
        return order_link(key.order_id)
