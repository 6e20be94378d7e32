from django.apps import AppConfig


class OrchestrationConfig(AppConfig):
    name = "orchestration"
    verbose_name = "Saga orchestration"

    def ready(self) -> None:
        from . import checks, live  # noqa: F401  (checks registers the definition version check)
        from .engine import run

        # The live feed publishes every engine transaction once it commits.
        if live.publish not in run.ON_FLUSH:
            run.ON_FLUSH.append(live.publish)
