"""Query filters of the stock list (`GET /api/inventory/?in_stock=true`)."""

from __future__ import annotations

from django.db.models import F

from sagaplatform.filters import BooleanFilter, FilterSet, TextFilter

from .models import StockItem


class StockFilter(FilterSet):
    in_stock = BooleanFilter(
        method="filter_in_stock",
        help_text="`true`: only SKUs with units available (on hand and not reserved); `false`: only the others.",
    )
    sku = TextFilter(field_name="sku", lookup_expr="startswith", max_length=64, help_text="SKUs starting with this.")

    class Meta:
        model = StockItem
        fields = ["in_stock", "sku"]

    def filter_in_stock(self, queryset, name, value):
        if value is None:
            return queryset
        available = {"on_hand__gt": F("reserved")}
        return queryset.filter(**available) if value else queryset.exclude(**available)
