from django.urls import path

from . import apis

urlpatterns = [
    path("", apis.OrdersApi.as_view(), name="orders"),
    path("<uuid:order_id>/", apis.OrderDetailApi.as_view(), name="order-detail"),
    path("<uuid:order_id>/cancel/", apis.OrderCancelApi.as_view(), name="order-cancel"),
]
