"""Query filters of the operators' saga list (`GET /api/sagas/`).

`state` takes the saga states plus two pseudo-states an operator looks for:
- `stuck`: not ended, and parked or with a step whose lease (`deadline_at`) has passed;
- `retrying`: not ended, with a step waiting out a backoff before its next attempt.
Both come from the annotations of `selectors.saga_list`, computed on the database clock.
"""

from __future__ import annotations

from datetime import timedelta

import django_filters
from django import forms
from django.db.models import Q
from drf_spectacular.utils import extend_schema_field

from sagaplatform.filters import BooleanFilter, DateTimeFilter, FilterSet
from sagaplatform.kernel.clock import db_now

from .definitions import DEFINITIONS, MODES
from .live import style_of
from .models import Saga

STUCK = "stuck"
RETRYING = "retrying"
STATE_CHOICES = [
    *Saga.State.choices,
    (STUCK, "stuck (parked, or a lease passed)"),
    (RETRYING, "a step waiting to retry"),
]
# The style each definition runs (orchestrated, parallel, tcc, choreography).
STYLE_OF_DEFINITION = {name: style_of(definition) for name, definition in DEFINITIONS.items()}
# Ages in seconds: bounded so that `now - age` is a date the database can hold.
MAX_AGE_SECONDS = 10 * 365 * 24 * 3600


class SecondsFilter(django_filters.Filter):
    field_class = forms.IntegerField


def seconds_filter(*, method: str, description: str) -> SecondsFilter:
    schema = {"type": "integer", "minimum": 0, "maximum": MAX_AGE_SECONDS, "description": description}
    return extend_schema_field(schema)(SecondsFilter(method=method, min_value=0, max_value=MAX_AGE_SECONDS))


class SagaFilter(FilterSet):
    state = django_filters.MultipleChoiceFilter(
        choices=STATE_CHOICES,
        method="filter_state",
        help_text="Sagas in any of these states (repeat the parameter for several). Besides the saga states: "
        "`stuck` (not ended, and parked or with a step past its lease) and `retrying` (not ended, with a step "
        "waiting out a backoff).",
    )
    style = django_filters.MultipleChoiceFilter(
        choices=[(style, style) for style in MODES],
        method="filter_style",
        help_text="The order's transaction style: orchestrated, parallel, tcc or choreography.",
    )
    definition = django_filters.MultipleChoiceFilter(
        choices=[(name, name) for name in DEFINITIONS], help_text="The saga definition's name."
    )
    order_id = django_filters.UUIDFilter(
        field_name="context__order_id", method="filter_order", help_text="The saga of this order."
    )
    stuck = BooleanFilter(
        field_name="stuck", help_text="`true`: only stuck sagas (see `state=stuck`); `false`: only the others."
    )
    created_after = DateTimeFilter(
        field_name="created_at", lookup_expr="gte", help_text="Started at or after (ISO 8601)."
    )
    created_before = DateTimeFilter(field_name="created_at", lookup_expr="lt", help_text="Started before (ISO 8601).")
    older_than = seconds_filter(
        method="filter_older_than", description="Started at least this many seconds ago (database clock)."
    )
    newer_than = seconds_filter(
        method="filter_newer_than", description="Started less than this many seconds ago (database clock)."
    )

    class Meta:
        model = Saga
        fields: list[str] = []

    def filter_state(self, queryset, name, values):
        if not values:
            return queryset
        wanted = Q(state__in=[v for v in values if v not in (STUCK, RETRYING)])
        if STUCK in values:
            wanted |= Q(stuck=True)
        if RETRYING in values:
            wanted |= Q(retrying=True)
        return queryset.filter(wanted)

    def filter_style(self, queryset, name, values):
        if not values:
            return queryset
        return queryset.filter(definition__in=[name for name, label in STYLE_OF_DEFINITION.items() if label in values])

    def filter_order(self, queryset, name, value):
        return queryset.filter(context__order_id=str(value))

    def filter_older_than(self, queryset, name, value):
        return queryset.filter(created_at__lte=db_now(queryset.db) - timedelta(seconds=value))

    def filter_newer_than(self, queryset, name, value):
        return queryset.filter(created_at__gt=db_now(queryset.db) - timedelta(seconds=value))
