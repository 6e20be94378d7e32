"""Query filters of the order list (`GET /api/orders/?status=pending&status=approved`)."""

from __future__ import annotations

import django_filters

from sagaplatform.filters import DateTimeFilter, FilterSet

from .models import Order


class OrderFilter(FilterSet):
    status = django_filters.MultipleChoiceFilter(
        choices=Order.Status.choices,
        help_text="Only orders in one of these statuses (repeat the parameter for several).",
    )
    mode = django_filters.MultipleChoiceFilter(choices=Order.Mode.choices, help_text="Only orders of these styles.")
    created_after = DateTimeFilter(
        field_name="created_at", lookup_expr="gte", help_text="Placed at or after (ISO 8601)."
    )
    created_before = DateTimeFilter(field_name="created_at", lookup_expr="lt", help_text="Placed before (ISO 8601).")

    class Meta:
        model = Order
        fields = ["status", "mode", "created_after", "created_before"]
