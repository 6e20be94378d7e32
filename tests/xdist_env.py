"""A pytest plugin (`-p tests.xdist_env` in pyproject's addopts), loaded before Django starts.

`make test-fast` runs on pytest-xdist workers. The Prometheus client picks its multiprocess
directory when the first metric value is made, and `/metrics` merges every file in it: workers
sharing one directory would count each other's sagas. Each worker gets a directory of its own,
before anything imports the client. Without xdist this does nothing."""

from __future__ import annotations

import os
import shutil

_worker = os.environ.get("PYTEST_XDIST_WORKER")
# The directory every process would share (as sagaplatform.observability.prepare_environment
# picks it; the plugin runs before that module can be imported).
_base = os.environ.get("PROMETHEUS_MULTIPROC_DIR") or os.path.join(
    os.environ.get("SAGA_VAR_DIR") or os.path.join(os.path.dirname(os.path.dirname(__file__)), "var"), "prometheus"
)
if _worker:
    _path = os.path.join(_base, f"xdist-{_worker}")
    shutil.rmtree(_path, ignore_errors=True)
    os.makedirs(_path)
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = _path
