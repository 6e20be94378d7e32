from django.apps import AppConfig


class OrdersConfig(AppConfig):
    name = "orders"

    def ready(self) -> None:
        from . import choreography, handlers  # noqa: F401  registers its operations and reactions
