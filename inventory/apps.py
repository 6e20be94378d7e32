from django.apps import AppConfig


class InventoryConfig(AppConfig):
    name = "inventory"

    def ready(self) -> None:
        from . import choreography, handlers  # noqa: F401  registers its operations and reactions
