"""Observability: Prometheus metrics, structured logs and OpenTelemetry traces.

Everything the rest of the code calls is here, as one-line hooks:

- `metrics.saga_event(run, kind, step, data)` from the engine's one place that records a timeline
  event, so the saga and step metrics agree with the dashboard's timeline;
- `metrics.*` and `tracing.*` from the kernel (outbox, command handler, barrier);
- `logging` configures structlog for every process (settings.LOGGING).

`prepare_environment()` runs first in every process (sagaplatform/__init__.py): the Prometheus
client reads PROMETHEUS_MULTIPROC_DIR when it is imported.
"""

from __future__ import annotations

import os
from pathlib import Path

BASE_DIR = Path(__file__).resolve().parent.parent.parent


def prepare_environment() -> None:
    """Point the Prometheus client at a directory shared by every process of this host (the web
    process, each worker and its children, beat), unless the environment already chose one."""
    path = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    if not path:
        var = Path(os.environ.get("SAGA_VAR_DIR") or BASE_DIR / "var")
        path = str(var / "prometheus")
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = path
    os.makedirs(path, exist_ok=True)
