from django.apps import AppConfig


class PaymentsConfig(AppConfig):
    name = "payments"

    def ready(self) -> None:
        from . import choreography, handlers  # noqa: F401  registers its operations and reactions
