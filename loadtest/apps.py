from django.apps import AppConfig


class LoadtestConfig(AppConfig):
    """Benchmarks, the load ramp and the simulation: tools run against a platform, never part of
    it. No models and no tasks module, so no production worker imports it."""

    name = "loadtest"
    verbose_name = "Load tests"
