from django.contrib import admin
from django.contrib.auth import views as auth_views
from django.urls import include, path
from drf_spectacular.views import SpectacularAPIView, SpectacularSwaggerView

from orchestration import views as orchestration_views

from . import views
from .auth_apis import TokenApi
from .kernel.apis import FaultDetailApi, FaultsApi
from .observability.views import metrics_view

urlpatterns = [
    path("", views.home, name="home"),
    path("healthz", views.healthz, name="healthz"),
    path("metrics", metrics_view, name="metrics"),
    path("favicon.ico", views.favicon),
    path("admin/", admin.site.urls),
    path("accounts/login/", auth_views.LoginView.as_view(redirect_authenticated_user=True), name="login"),
    path("accounts/logout/", auth_views.LogoutView.as_view(), name="logout"),
    path("orders/", include("orders.page_urls")),
    path("dashboard/", orchestration_views.dashboard, name="dashboard"),
    path("api/auth/token/", TokenApi.as_view(), name="auth-token"),
    path("api/orders/", include("orders.urls")),
    path("api/inventory/", include("inventory.urls")),
    path("api/sagas/", include("orchestration.urls")),
    path("api/alerts/", include("orchestration.alerting_urls")),
    path("api/faults/", FaultsApi.as_view(), name="faults"),
    path("api/faults/<str:service>/<int:rule_id>/", FaultDetailApi.as_view(), name="fault-detail"),
    path("api/schema/", SpectacularAPIView.as_view(), name="schema"),
    path("api/docs/", SpectacularSwaggerView.as_view(url_name="schema"), name="api-docs"),
]

handler404 = "sagaplatform.views.not_found"
handler500 = "sagaplatform.views.error"
