"""`/metrics`: the merged samples of every process on this host, plus the scrape-time gauges.

Our own view, not django-prometheus's: that one builds a fresh registry in multiprocess mode,
which would leave out the collectors read from the databases.

Protected by a bearer token (`SAGA_METRICS_TOKEN`): Prometheus sends it with
`authorization: {credentials: ...}`. Without a token it is open only with DJANGO_DEBUG on (the
embedded mode); in production it answers 403 until a token is set.
"""

from __future__ import annotations

import hmac

from django.conf import settings
from django.http import HttpResponse, JsonResponse
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest, multiprocess

from . import metrics
from .collectors import DatabaseCollector


def _refused(status: int, code: str, message: str) -> JsonResponse:
    response = JsonResponse({"code": code, "message": message, "details": {}}, status=status)
    if status == 401:
        response["WWW-Authenticate"] = 'Bearer realm="metrics"'
    return response


def metrics_view(request):
    token = settings.SAGA_METRICS_TOKEN
    if token:
        given = request.headers.get("Authorization", "")
        scheme, _, credentials = given.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(credentials.strip().encode(), token.encode()):
            return _refused(401, "not_authenticated", "A valid bearer token is required for /metrics")
    elif not settings.DEBUG:
        return _refused(403, "metrics_disabled", "Set SAGA_METRICS_TOKEN to enable /metrics in production")
    registry = CollectorRegistry()
    multiprocess.MultiProcessCollector(registry, path=metrics.directory())
    registry.register(DatabaseCollector())
    return HttpResponse(generate_latest(registry), content_type=CONTENT_TYPE_LATEST)
