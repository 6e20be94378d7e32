"""Admin for shipments: read-only. A booking is scheduled, confirmed, dispatched or cancelled
by its saga's steps; dispatch is the saga's point of no return, never a hand edit."""

from __future__ import annotations

from django.contrib import admin

from sagaplatform.kernel.admin import ReadOnlyAdminMixin, age_filter, order_link, saga_link

from .models import Shipment


@admin.register(Shipment)
class ShipmentAdmin(ReadOnlyAdminMixin, admin.ModelAdmin):
    list_display = ["tracking_number", "state", "carrier", "order", "saga", "created_at", "dispatched_at"]
    list_filter = ["state", "carrier", age_filter()]
    search_fields = ["tracking_number", "order_id", "saga_id", "address__name"]

    @admin.display(description="order", ordering="order_id")
    def order(self, shipment: Shipment) -> str:
        return order_link(shipment.order_id)

    @admin.display(description="saga", ordering="saga_id")
    def saga(self, shipment: Shipment) -> str:
        return saga_link(shipment.saga_id)
