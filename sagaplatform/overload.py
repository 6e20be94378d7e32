"""Shedding load at the door of the web process, before Django spends anything on a request."""

from __future__ import annotations

import json
import logging

from django.conf import settings
from django.db import InterfaceError, OperationalError
from django.http import HttpResponse, JsonResponse

from sagaplatform.observability import http as http_metrics

logger = logging.getLogger(__name__)


class ConcurrencyLimit:
    """ASGI middleware: while `limit` HTTP requests are in progress, answer the next ones 503
    with Retry-After at once, with no thread, no database connection and no authentication.

    Daphne runs every request in a thread of its own and queues what it cannot serve: past what
    the process can do, answers came back later and later (12 s at 80 orders/s here) and refused
    orders cost as much as accepted ones. One event loop serves every request, so a plain counter
    is enough. Websockets are not counted: they are long-lived and authenticate on their own.
    """

    def __init__(self, app, *, limit: int, retry_after: int) -> None:
        self.app, self.limit, self.active = app, limit, 0
        self.body = json.dumps(
            {
                "code": "overloaded",
                "message": "The server is busy; retry in a moment.",
                "details": {"retry_after": retry_after},
            }
        ).encode()
        self.headers = [(b"content-type", b"application/json"), (b"retry-after", str(retry_after).encode())]

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http" or not self.limit:
            return await self.app(scope, receive, send)
        if self.active >= self.limit:
            http_metrics.shed(scope.get("method"))
            await send({"type": "http.response.start", "status": 503, "headers": self.headers})
            await send({"type": "http.response.body", "body": self.body})
            return None
        self.active += 1
        try:
            return await self.app(scope, receive, send)
        finally:
            self.active -= 1


class DatabaseUnavailableMiddleware:
    """A page or a non-DRF endpoint whose database is down or saturated answers 503 with
    Retry-After, as the API does (`sagaplatform.api.exception_handler`), rather than a 500.

    `OperationalError` and `InterfaceError` are what a refused connection, "too many clients", an
    empty web pool (`DATABASE_POOL_TIMEOUT`) or a restarting server raise; the request's work
    rolled back with its transaction, so a retry is the right answer for the client.
    """

    def __init__(self, get_response) -> None:
        self.get_response = get_response

    def __call__(self, request):
        return self.get_response(request)

    def process_exception(self, request, exception):
        if not isinstance(exception, (OperationalError, InterfaceError)):
            return None
        logger.warning("database unavailable, answering 503: %s", exception)
        retry_after = settings.API_RETRY_AFTER
        if request.path.startswith("/api/"):
            body = {"code": "service_unavailable", "message": "A database is unavailable or busy; retry later."}
            response = JsonResponse({**body, "details": {"retry_after": retry_after}}, status=503)
        else:
            response = HttpResponse(
                "The service is busy or a database is unavailable. Please try again in a moment.",
                status=503,
                content_type="text/plain; charset=utf-8",
            )
        response["Retry-After"] = str(retry_after)
        return response
