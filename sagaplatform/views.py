from __future__ import annotations

from django.conf import settings
from django.db import connections
from django.http import JsonResponse
from django.shortcuts import render


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
