from django.apps import AppConfig


class KernelConfig(AppConfig):
    """The ground floor every service and the orchestrator stand on.

    Barrier, outbox, the command/reply contract. It imports no service and no orchestrator code;
    its tables are migrated into every service database (see `sagaplatform.routers`).
    """

    name = "sagaplatform.kernel"
    label = "kernel"
    verbose_name = "Messaging kernel"

    def ready(self) -> None:
        from . import sqlcache

        sqlcache.install()  # psycopg's parse of the engine's long statements, cached
