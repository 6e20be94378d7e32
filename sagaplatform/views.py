from __future__ import annotations

from django.conf import settings
from django.db import connections
from django.http import JsonResponse
from django.shortcuts import render
from django.views.defaults import page_not_found, server_error


def home(request):
    return render(request, "home.html")


def healthz(request):
    """Liveness of every database; 503 if any is unreachable."""
    checks = {}
    for alias in settings.DATABASE_ALIASES:
        try:
            with connections[alias].cursor() as cursor:
                cursor.execute("SELECT 1")
            checks[alias] = "ok"
        except Exception as exc:  # report, never raise: this is the page that says what is down
            checks[alias] = f"error: {type(exc).__name__}"
    healthy = all(v == "ok" for v in checks.values())
    return JsonResponse(
        {"status": "ok" if healthy else "degraded", "databases": checks}, status=200 if healthy else 503
    )


def not_found(request, exception=None):
    """JSON for API paths (a malformed id never reaches a DRF view), HTML elsewhere."""
    if request.path.startswith("/api/"):
        return JsonResponse({"code": "not_found", "message": "No such resource.", "details": {}}, status=404)
    return page_not_found(request, exception)


def error(request):
    if request.path.startswith("/api/"):
        return JsonResponse(
            {"code": "server_error", "message": "Something went wrong on our side.", "details": {}}, status=500
        )
    return server_error(request)
