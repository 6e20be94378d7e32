"""The customer's HTML pages (the JSON API is in `urls.py`, under /api/orders/)."""

from django.urls import path

from . import views

app_name = "order_pages"

urlpatterns = [
    path("", views.order_list, name="list"),
    path("new/", views.order_new, name="new"),
    path("new/<uuid:form_key>/", views.order_new, name="new_keyed"),
    path("<uuid:order_id>/", views.order_detail, name="detail"),
    path("<uuid:order_id>/cancel/", views.order_cancel, name="cancel"),
]
