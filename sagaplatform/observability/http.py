"""HTTP request metrics of the web process: requests, latency, requests in progress, exceptions.

`HttpMetricsMiddleware` is the first middleware (settings.MIDDLEWARE), so it times the whole
Django stack and sees every answer, those of the other middlewares (a static file, a CSRF
refusal, a lockout) included. The ASGI concurrency limit (`overload.ConcurrencyLimit`) answers
503 before Django: it counts its refusals with `shed()`.

Labels are bounded: `method` (the standard methods, anything else `other`), `route` (the URL
pattern the request matched, such as `/api/orders/<uuid:pk>/`, never the path with its ids;
`(unmatched)` for a path no pattern matches, `(static)` for a static file, `(shed)` for a request
the concurrency limit refused) and `status` (the answer's code).

Our own rather than django-prometheus's middleware: see docs/OPERATIONS.md, "HTTP".
"""

from __future__ import annotations

import time

from asgiref.sync import iscoroutinefunction, markcoroutinefunction
from django.conf import settings
from django.core.signals import got_request_exception
from prometheus_client import Counter, Gauge, Histogram

from . import metrics

PREFIX = metrics.PREFIX
METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
UNMATCHED, STATIC, SHED = "(unmatched)", "(static)", "(shed)"

REQUESTS = Counter(
    f"{PREFIX}_http_requests",
    "HTTP requests answered, by method, route (URL pattern) and status code",
    ["method", "route", "status"],
)
LATENCY = Histogram(
    f"{PREFIX}_http_request_duration_seconds",
    "From a request entering Django to its answer leaving it (to the first byte of a streamed one)",
    ["method", "route"],
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, float("inf")),
)
IN_PROGRESS = Gauge(
    f"{PREFIX}_http_requests_in_progress",
    "HTTP requests Django is serving now",
    multiprocess_mode="livesum",  # a web process that exits takes its share with it
)
EXCEPTIONS = Counter(
    f"{PREFIX}_http_exceptions",
    "Requests whose view or middleware raised an exception nothing handled (answered 500)",
    ["method", "route"],
)


def method_label(method: str | None) -> str:
    return method if method in METHODS else "other"


def route_label(request) -> str:
    """The URL pattern the request matched, from the site's root: never the path itself."""
    match = getattr(request, "resolver_match", None)
    if match is not None and match.route:
        return "/" + match.route
    static = settings.STATIC_URL or ""
    if static and request.path.startswith(static if static.startswith("/") else "/" + static):
        return STATIC
    return UNMATCHED


def _observe(request, response, started: float) -> None:
    method, route = method_label(request.method), route_label(request)
    REQUESTS.labels(method, route, str(response.status_code)).inc()
    LATENCY.labels(method, route).observe(time.perf_counter() - started)


class HttpMetricsMiddleware:
    """Counts and times every request (sync or async: it never adds a thread hop)."""

    sync_capable = True
    async_capable = True

    def __init__(self, get_response) -> None:
        self.get_response = get_response
        self.is_async = iscoroutinefunction(get_response)
        if self.is_async:
            markcoroutinefunction(self)

    def __call__(self, request):
        if self.is_async:
            return self._acall(request)
        if not metrics.ENABLED:
            return self.get_response(request)
        started = time.perf_counter()
        IN_PROGRESS.inc()
        try:
            response = self.get_response(request)
        finally:
            IN_PROGRESS.dec()
        _observe(request, response, started)
        return response

    async def _acall(self, request):
        if not metrics.ENABLED:
            return await self.get_response(request)
        started = time.perf_counter()
        IN_PROGRESS.inc()
        try:
            response = await self.get_response(request)
        finally:
            IN_PROGRESS.dec()
        _observe(request, response, started)
        return response


def _unhandled_exception(sender=None, request=None, **kwargs) -> None:
    """Django is about to answer 500 for an exception nothing handled (`got_request_exception`).
    A database down or busy is handled (503, `overload.DatabaseUnavailableMiddleware`): it shows
    in the status, not here."""
    if metrics.ENABLED and request is not None:
        EXCEPTIONS.labels(method_label(getattr(request, "method", None)), route_label(request)).inc()


def shed(method: str | None) -> None:
    """A request the ASGI concurrency limit answered 503 before Django saw it."""
    if metrics.ENABLED:
        REQUESTS.labels(method_label(method), SHED, "503").inc()


def connect() -> None:
    got_request_exception.connect(_unhandled_exception, dispatch_uid="sagaplatform.http_exceptions")
