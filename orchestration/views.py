"""The operator dashboard page. Everything on it is live: the page is a shell, the data comes from
the `/ws/dashboard/` websocket (docs/LIVE_FEED.md), which checks the user again on its own."""

from __future__ import annotations

from django.conf import settings
from django.contrib.auth.decorators import login_required
from django.shortcuts import render

from .definitions import DEFINITIONS
from .filters import STATE_CHOICES, STEP_NAMES, SagaFilter
from .models import Saga, SagaStep
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
            "filter_errors": url_filter_errors(request.GET),
            # Only the first paint uses this (buttons start disabled for a read-only operator);
            # the websocket's `hello.can_operate` is what the page acts on afterwards.
            "can_operate": request.user.has_perm(OPERATE),
            "ws_path": "/ws/dashboard/",
            # The saga view links its trace id here (docs/OPERATIONS.md, "Traces").
            "trace_url_template": settings.SAGA_TRACE_URL_TEMPLATE,
            # The search form's choices (the filters of GET /api/sagas/search/).
            "definitions": sorted(DEFINITIONS),
            "states": STATE_CHOICES,
            "steps": STEP_NAMES,
            "step_states": SagaStep.State.choices,
        },
    )


def url_filter_errors(query) -> dict[str, list[str]]:
    """What is wrong with the filters in the page's URL (a shared link with a typo): the page
    says so at once, rather than showing an empty list."""
    if not any(key in SagaFilter.base_filters or key == "page" for key in query):
        return {}
    errors: dict[str, list[str]] = {}
    page = query.get("page")
    if page is not None and not (page.isascii() and page.isdigit() and int(page) > 0):
        errors["page"] = ["A positive integer is required."]
    filterset = SagaFilter(data=query, queryset=Saga.objects.none())
    if not filterset.is_valid():
        errors.update({name: [str(e) for e in errs] for name, errs in filterset.errors.items()})
    return errors
