"""The operator dashboard page. Everything on it is live: the page is a shell, the data comes from
the `/ws/dashboard/` websocket (docs/LIVE_FEED.md), which checks the user again on its own."""

from __future__ import annotations

from django.conf import settings
from django.contrib.auth.decorators import login_required
from django.shortcuts import render

from .permissions import OPERATE


@login_required
def dashboard(request):
    # Anonymous users are sent to the login page by the decorator; a signed-in customer gets a
    # plain "not for you" page rather than a login loop (they are logged in, just not staff).
    if not request.user.is_staff:
        return render(request, "dashboard/forbidden.html", status=403)
    return render(
        request,
        "dashboard/index.html",
        {
            # Only the first paint uses this (buttons start disabled for a read-only operator);
            # the websocket's `hello.can_operate` is what the page acts on afterwards.
            "can_operate": request.user.has_perm(OPERATE),
            "ws_path": "/ws/dashboard/",
            # The saga view links its trace id here (docs/OPERATIONS.md, "Traces").
            "trace_url_template": settings.SAGA_TRACE_URL_TEMPLATE,
        },
    )
