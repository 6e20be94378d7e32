from __future__ import annotations

from django.conf import settings
from django.db import connections
from django.http import HttpResponsePermanentRedirect, JsonResponse
from django.shortcuts import render
from django.templatetags.static import static
from django.views.defaults import page_not_found, server_error

from . import workers


def home(request):
    return render(request, "home.html")


def healthz(request):
    """Every database, the broker and the live workers; 503 if a database or the broker is down.

    Anonymous callers (a load balancer's probe) get the status only: the names of databases,
    queues, their depths and the workers' host names are for staff, a staff user's API token, or
    the SAGA_HEALTHZ_TOKEN bearer token.

    No live worker is reported but is not an error here: the embedded mode's workers start with
    the server, and a production deployment may run its workers elsewhere."""
    checks = {}
    for alias in settings.DATABASE_ALIASES:
        try:
            with connections[alias].cursor() as cursor:
                cursor.execute("SELECT 1")
            checks[alias] = "ok"
        except Exception as exc:  # report, never raise: this is the page that says what is down
            checks[alias] = f"error: {type(exc).__name__}"
    depths = workers.queue_depths()
    broker_ok = all(depth is not None for depth in depths.values())
    healthy = broker_ok and all(v == "ok" for v in checks.values())
    status = 200 if healthy else 503
    if not _may_see_health_details(request):
        return JsonResponse({"status": "ok" if healthy else "degraded"}, status=status)
    return JsonResponse(
        {
            "status": "ok" if healthy else "degraded",
            "databases": checks,
            "broker": {"status": "ok" if broker_ok else "unreachable", "queues": depths},
            "workers": [{"name": w["name"], "queues": w["queues"]} for w in workers.live_workers()],
        },
        status=status,
    )


def _may_see_health_details(request) -> bool:
    from django.utils.crypto import constant_time_compare
    from rest_framework.authtoken.models import Token

    scheme, _, credential = request.headers.get("Authorization", "").partition(" ")
    credential = credential.strip()
    bearer = scheme.lower() in ("bearer", "token") and credential
    if bearer and settings.SAGA_HEALTHZ_TOKEN and constant_time_compare(credential, settings.SAGA_HEALTHZ_TOKEN):
        return True
    try:  # the session and the tokens live on `default`, which may be the database that is down
        if request.user.is_active and request.user.is_staff:
            return True
        return bool(bearer) and Token.objects.filter(key=credential, user__is_active=True, user__is_staff=True).exists()
    except Exception:
        return False


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


def favicon(request):
    """Browsers ask for /favicon.ico whatever a page's <link rel="icon"> says."""
    return HttpResponsePermanentRedirect(static("img/favicon.svg"))
