"""The circuit breakers in the admin (/admin/orchestration/breakers/): no model, their state is in
Redis (`sagaplatform/kernel/breakers.py`), so a page registered in the admin site
(`sagaplatform/admin_site.py`).

Every staff user sees each breaker: its state, the calls and failures in its window and their
rate, when it changed, when an open one will half-open, the probes reserved, and its recent
transitions. Operators (staff with `orchestration.operate_saga`) may reset (close) a breaker or
force it open for a while, with a reason; each is recorded in the admin's log of actions
(*Recent actions*: who, when, what, why) and in the breaker's own transitions.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any, cast

from django import forms
from django.conf import settings
from django.contrib import admin, messages
from django.contrib.admin.models import CHANGE, LogEntry
from django.core.exceptions import PermissionDenied
from django.http import HttpRequest, HttpResponse, HttpResponseRedirect
from django.template.response import TemplateResponse
from django.urls import reverse

from sagaplatform.admin_site import AdminView
from sagaplatform.api import operator_actor
from sagaplatform.kernel import breakers

from .permissions import OPERATE

AUDIT_PREFIX = "circuit breaker "  # LogEntry.object_repr of every breaker action
MAX_FORCE_SECONDS = 24 * 3600


def breaker_names() -> list[str]:
    return sorted({*settings.SERVICE_ALIASES, breakers.GATEWAY, *_known()})


def _known() -> list[str]:
    try:
        return breakers.names()
    except Exception:
        return []


class BreakerActionForm(forms.Form):
    breaker = forms.ChoiceField(choices=())
    action = forms.ChoiceField(choices=[("close", "reset (close)"), ("open", "force open")])
    seconds = forms.FloatField(
        required=False,
        min_value=1,
        max_value=MAX_FORCE_SECONDS,
        help_text="Force open: for how long (then it probes as usual).",
    )
    reason = forms.CharField(max_length=500, strip=True)

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        breaker = cast("forms.ChoiceField", self.fields["breaker"])
        breaker.choices = [(n, n) for n in breaker_names()]


def _when(epoch: float | None) -> datetime | None:
    return datetime.fromtimestamp(epoch, UTC) if epoch else None


def _rows(found: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    rows = []
    for name, b in found.items():
        now = b["now"]
        rows.append(
            {
                **b,
                "name": name,
                "state_label": b["state"].replace("_", "-"),
                "failure_percent": None if b["failure_rate"] is None else round(100 * b["failure_rate"], 1),
                "changed": _when(b["changed_at"]),
                "half_open": _when(b["half_open_at"]),
                "half_open_in": round(b["half_open_at"] - now, 1) if b["half_open_at"] else None,
                "recent": [{**t, "when": _when(t["at"])} for t in b["recent"][:10]],
            }
        )
    return rows


def _audit(request: HttpRequest, name: str, message: str) -> None:
    LogEntry.objects.create(
        user_id=int(request.user.pk or 0),
        content_type=None,
        object_id=name,
        object_repr=f"{AUDIT_PREFIX}{name}",
        action_flag=CHANGE,
        change_message=message,
    )


def breakers_view(request: HttpRequest) -> HttpResponse:
    operator = request.user.has_perm(OPERATE)
    form = BreakerActionForm()
    status = 200
    if request.method == "POST":
        if not operator:
            raise PermissionDenied("Only operators may reset or force a circuit breaker.")
        form = BreakerActionForm(request.POST)
        if form.is_valid():
            done = _apply(request, form.cleaned_data)
            if done:
                return HttpResponseRedirect(reverse("admin:orchestration_breakers"))
            status = 503
        else:
            status = 400
            for field, errors in form.errors.items():
                messages.error(request, f"{field}: {' '.join(str(e) for e in errors)}")
    try:
        rows = _rows(breakers.detail(breaker_names()))
        unavailable = False
    except Exception:
        rows, unavailable = [], True
    context = {
        **admin.site.each_context(request),
        "title": "Circuit breakers",
        "rows": rows,
        "unavailable": unavailable,
        "operator": operator,
        "enabled": breakers.enabled(),
        "form": form,
        "config": {
            "window": settings.BREAKER_WINDOW,
            "min_calls": settings.BREAKER_MIN_CALLS,
            "failure_percent": round(100 * settings.BREAKER_FAILURE_RATE, 1),
            "open_seconds": settings.BREAKER_OPEN_SECONDS,
            "probes": settings.BREAKER_HALF_OPEN_PROBES,
            "resume_spread": settings.BREAKER_RESUME_SPREAD,
        },
        "actions": LogEntry.objects.filter(content_type=None, object_repr__startswith=AUDIT_PREFIX)
        .select_related("user")
        .order_by("-action_time")[:20],
    }
    return TemplateResponse(request, "admin/breakers.html", context, status=status)


def _apply(request: HttpRequest, data: dict[str, Any]) -> bool:
    name, action, reason = data["breaker"], data["action"], data["reason"]
    actor = operator_actor(request.user)
    to = breakers.CLOSED if action == "close" else breakers.OPEN
    seconds = data.get("seconds") or settings.BREAKER_OPEN_SECONDS
    try:
        was = breakers.force(name, to, by=actor, seconds=seconds if to == breakers.OPEN else None)
    except Exception:
        messages.error(request, f"The breakers' store (Redis) did not answer: {name} was left as it was.")
        return False
    what = "reset (closed)" if to == breakers.CLOSED else f"forced open for {seconds:g} s"
    _audit(request, name, f"{what}, was {was.replace('_', '-')}: {reason}")
    messages.success(request, f"The {name} circuit breaker was {what}.")
    return True


admin.site.register_view(  # type: ignore[attr-defined]  # sagaplatform.admin_site.SagaAdminSite
    AdminView(
        app_label="orchestration",
        name="breakers",
        title="Circuit breakers",
        view=breakers_view,
        allowed=lambda request: request.user.is_staff,
    )
)
