"""Stock endpoints (any logged-in user): what is on hand, reserved by orders in flight, and available."""

from __future__ import annotations

from drf_spectacular.types import OpenApiTypes
from drf_spectacular.utils import (
    OpenApiExample,
    OpenApiParameter,
    extend_schema,
    extend_schema_serializer,
    extend_schema_view,
)
from rest_framework import generics, serializers
from rest_framework.exceptions import NotFound
from rest_framework.response import Response
from rest_framework.views import APIView

from sagaplatform.api import LIST_ERROR_EXAMPLES, error_responses

from . import selectors
from .filters import StockFilter


@extend_schema_serializer(
    component_name="StockItem",
    examples=[
        OpenApiExample(
            "mugs",
            value={"sku": "SKU-MUG", "on_hand": 50, "reserved": 3, "available": 47, "version": 12},
            response_only=True,
        )
    ],
)
class StockItemSerializer(serializers.Serializer):
    sku = serializers.CharField(help_text="The SKU, as in the catalogue.")
    on_hand = serializers.IntegerField(help_text="Units in the warehouse.")
    reserved = serializers.IntegerField(help_text="Units held for orders in flight, invisible to other orders.")
    available = serializers.IntegerField(help_text="on_hand - reserved: what a new order can have.")
    version = serializers.IntegerField(help_text="Bumped by every change (optimistic locking).")


@extend_schema_view(
    get=extend_schema(
        operation_id="inventory_list",
        tags=["inventory"],
        summary="List stock",
        description="Every SKU's stock, by SKU.",
        responses={200: StockItemSerializer(many=True), **error_responses(400, 401, 404, examples=LIST_ERROR_EXAMPLES)},
    )
)
class StockListApi(generics.ListAPIView):
    serializer_class = StockItemSerializer
    filterset_class = StockFilter

    def get_queryset(self):
        return selectors.stock_list()


class StockDetailApi(APIView):
    @extend_schema(
        operation_id="inventory_retrieve",
        tags=["inventory"],
        summary="Read one SKU's stock",
        parameters=[
            OpenApiParameter(
                "sku", OpenApiTypes.STR, OpenApiParameter.PATH, examples=[OpenApiExample("mugs", value="SKU-MUG")]
            )
        ],
        responses={200: StockItemSerializer, **error_responses(401, 404)},
    )
    def get(self, request, sku: str):
        # No SKU holds a NUL, and PostgreSQL refuses one even in a lookup.
        item = None if "\x00" in sku else selectors.stock_get(sku=sku)
        if item is None:
            raise NotFound(f"No stock item with SKU {sku!r}.")
        return Response(StockItemSerializer(item).data)
