"""A pytest plugin (`-p tests.xdist_env` in pyproject's addopts), loaded before Django starts.

`make test` runs both tiers on pytest-xdist workers (gw0, gw1...). pytest-django gives each
worker test databases of its own (`test_<name>_gw0`...); this gives each the rest of what a run
writes to, before Django reads its settings, so that workers, and the processes their tests
start (which inherit the environment), never see each other:

* a Redis database of its own (`REDIS_URL`'s number, minus the worker's: 15, 14...): the Celery
  queues a test's worker processes consume, the cache, the channel layer, the circuit breakers
  and the stock-contention counts. Celery's broadcast channels carry the database's number too.
  An end-to-end test that empties its broker (`flush_broker`) empties its own;
* a var/ directory of its own (`SAGA_VAR_DIR`, var/xdist-gw0/...): the beat schedule and logs of
  the simulation's processes, the embedded SQLite files;
* a Prometheus multiprocess directory of its own, emptied: `/metrics` merges every file in it,
  and workers sharing one would count each other's sagas.

Without xdist this does nothing."""

from __future__ import annotations

import os
import shutil
from urllib.parse import urlsplit, urlunsplit

REDIS_DATABASES = 16  # Redis's default `databases`


def redis_url_for(url: str, index: int) -> str:
    """`url` with its database number moved down by `index` (wrapping within Redis's 16)."""
    parts = urlsplit(url)
    number = int(parts.path.strip("/") or 0)
    return urlunsplit(parts._replace(path=f"/{(number - index) % REDIS_DATABASES}"))


_worker = os.environ.get("PYTEST_XDIST_WORKER")
if _worker:
    _index = int(_worker.removeprefix("gw"))
    if os.environ.get("REDIS_URL"):
        os.environ["REDIS_URL"] = redis_url_for(os.environ["REDIS_URL"], _index)
    _root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    _var = os.path.join(os.environ.get("SAGA_VAR_DIR") or os.path.join(_root, "var"), f"xdist-{_worker}")
    os.makedirs(_var, exist_ok=True)
    os.environ["SAGA_VAR_DIR"] = _var
    # As sagaplatform.observability.prepare_environment would pick it (that module cannot be
    # imported yet), emptied of an earlier run's files.
    _base = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    _prometheus = os.path.join(_base, f"xdist-{_worker}") if _base else os.path.join(_var, "prometheus")
    shutil.rmtree(_prometheus, ignore_errors=True)
    os.makedirs(_prometheus)
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = _prometheus
