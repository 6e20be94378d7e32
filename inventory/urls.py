from django.urls import path

from . import apis

urlpatterns = [
    path("", apis.StockListApi.as_view(), name="stock-list"),
    path("<str:sku>/", apis.StockDetailApi.as_view(), name="stock-detail"),
]
