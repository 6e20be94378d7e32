from django.apps import AppConfig


class ObservabilityConfig(AppConfig):
    name = "sagaplatform.observability"
    label = "observability"

    def ready(self) -> None:
        from . import http, logging, signals, tracing

        logging.configure_structlog()
        tracing.configure()
        signals.connect()
        http.connect()
