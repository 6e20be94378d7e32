from __future__ import annotations

from drf_spectacular.utils import extend_schema
from rest_framework import serializers
from rest_framework.exceptions import NotFound
from rest_framework.response import Response
from rest_framework.views import APIView

from . import selectors


class StockItemSerializer(serializers.Serializer):
    sku = serializers.CharField()
    on_hand = serializers.IntegerField()
    reserved = serializers.IntegerField()
    available = serializers.IntegerField()
    version = serializers.IntegerField()


class StockListApi(APIView):
    @extend_schema(operation_id="inventory_list", responses={200: StockItemSerializer(many=True)})
    def get(self, request):
        return Response(StockItemSerializer(selectors.stock_list(), many=True).data)


class StockDetailApi(APIView):
    @extend_schema(operation_id="inventory_retrieve", responses={200: StockItemSerializer})
    def get(self, request, sku: str):
        item = selectors.stock_get(sku=sku)
        if item is None:
            raise NotFound(f"No stock item with SKU {sku!r}.")
        return Response(StockItemSerializer(item).data)
