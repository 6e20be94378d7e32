"""Admin for notifications: read-only. They are written with their saga step and delivered (and
redelivered while queued) by the outbox; the history of what a customer was told stays as sent."""

from __future__ import annotations

from django.contrib import admin

from sagaplatform.kernel.admin import ReadOnlyAdminMixin, age_filter, order_link, saga_link

from .models import Notification


@admin.register(Notification)
class NotificationAdmin(ReadOnlyAdminMixin, admin.ModelAdmin):
    list_display = ["created_at", "kind", "channel", "recipient", "state", "order", "saga", "sent_at"]
    list_filter = ["state", "kind", "channel", age_filter()]
    search_fields = ["recipient", "order_id", "saga_id", "subject"]

    @admin.display(description="order", ordering="order_id")
    def order(self, notification: Notification) -> str:
        return order_link(notification.order_id)

    @admin.display(description="saga", ordering="saga_id")
    def saga(self, notification: Notification) -> str:
        return saga_link(notification.saga_id)
