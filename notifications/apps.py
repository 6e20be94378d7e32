from django.apps import AppConfig


class NotificationsConfig(AppConfig):
    name = "notifications"

    def ready(self) -> None:
        from . import choreography, handlers  # noqa: F401  registers its operations and reactions
