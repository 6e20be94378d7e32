"""Keep each service's models on the database alias named after it.

Services own their data: `inventory` models live only on the `inventory` alias, and so on. The
orchestrator and Django's own apps (auth, sessions, admin) live on `default`. The kernel app
(barrier, outbox) is shared infrastructure: its tables exist in every database, and its code
always names the alias explicitly. Its service registry (`ServiceInstance`) is the exception:
it lives only on `default`, with the engine that reads it.
"""

from __future__ import annotations

from django.conf import settings

KERNEL_APP = "kernel"
DEFAULT_ONLY = {"serviceinstance"}  # kernel models that live on `default` only


def alias_for_app(app_label: str) -> str:
    return app_label if app_label in settings.SERVICE_ALIASES else "default"


class ServiceRouter:
    def db_for_read(self, model, **hints):
        if model._meta.app_label == KERNEL_APP:
            return "default" if model._meta.model_name in DEFAULT_ONLY else hints.get("using")
        return alias_for_app(model._meta.app_label)

    db_for_write = db_for_read

    def allow_relation(self, obj1, obj2, **hints):
        # No foreign key crosses a service boundary: services refer to each other by UUID.
        return alias_for_app(obj1._meta.app_label) == alias_for_app(obj2._meta.app_label)

    def allow_migrate(self, db, app_label, model_name=None, **hints):
        if app_label == KERNEL_APP:
            return db == "default" if model_name in DEFAULT_ONLY else True
        return db == alias_for_app(app_label)
