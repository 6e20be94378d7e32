from django.apps import AppConfig


class ShippingConfig(AppConfig):
    name = "shipping"

    def ready(self) -> None:
        from . import choreography, handlers  # noqa: F401  registers its operations and reactions
