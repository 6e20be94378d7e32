"""The admin site: Django's, plus pages that are no model's.

Some state an operator acts on lives outside the databases (the circuit breakers, in Redis), so
it has no model and no ModelAdmin. Such a page is registered with `admin.site.register_view`: it
gets a URL under /admin/ (behind the admin's login and CSRF protection), and a row on the admin
index and its app's page, among that app's models, for the staff its `allowed` check lets in.
No model, no migration.

INSTALLED_APPS names `sagaplatform.admin_site.AdminConfig` in place of `django.contrib.admin`,
so `django.contrib.admin.site` is a `SagaAdminSite`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from django.apps import apps as django_apps
from django.contrib import admin
from django.contrib.admin.apps import AdminConfig as DjangoAdminConfig
from django.http import HttpRequest, HttpResponse
from django.urls import path, reverse


@dataclass(frozen=True)
class AdminView:
    app_label: str  # listed with this app's models (one that has a model in the admin)
    name: str  # in URLs: /admin/<app_label>/<name>/, the URL name admin:<app_label>_<name>
    title: str  # as listed on the index
    view: Callable[..., HttpResponse]
    allowed: Callable[[HttpRequest], bool]  # who sees it (staff only, whatever this says)

    @property
    def url_name(self) -> str:
        return f"{self.app_label}_{self.name}"


class SagaAdminSite(admin.AdminSite):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._views: dict[str, AdminView] = {}

    def register_view(self, view: AdminView) -> None:
        self._views[view.url_name] = view

    def get_urls(self):
        extra = [
            path(f"{v.app_label}/{v.name}/", self.admin_view(v.view), name=v.url_name) for v in self._views.values()
        ]
        return extra + super().get_urls()

    def get_app_list(self, request: HttpRequest, app_label: str | None = None) -> list[Any]:
        apps = super().get_app_list(request, app_label)
        for v in self._views.values():
            if (app_label and v.app_label != app_label) or not v.allowed(request):
                continue
            app = next((a for a in apps if a["app_label"] == v.app_label), None)
            if app is None:  # the app shows nothing else to this user
                config = django_apps.get_app_config(v.app_label)
                app = {
                    "name": config.verbose_name,
                    "app_label": v.app_label,
                    "app_url": reverse("admin:app_list", kwargs={"app_label": v.app_label}, current_app=self.name),
                    "has_module_perms": True,
                    "models": [],
                }
                apps.append(app)
                apps.sort(key=lambda a: str(a["name"]).lower())
            app["models"].append(
                {
                    "model": None,
                    "name": v.title,
                    "object_name": v.name,
                    "perms": {"view": True},
                    "admin_url": reverse(f"admin:{v.url_name}", current_app=self.name),
                    "add_url": None,
                    "view_only": True,
                }
            )
            app["models"].sort(key=lambda m: str(m["name"]))
        return apps


class AdminConfig(DjangoAdminConfig):
    default_site = "sagaplatform.admin_site.SagaAdminSite"
