"""Query filters of the operators' saga list (`GET /api/sagas/`).

`state` takes the saga states plus two pseudo-states an operator looks for:
- `stuck`: not ended, and parked or with a step whose lease (`deadline_at`) has passed;
- `retrying`: not ended, with a step waiting out a backoff before its next attempt.
Both come from the annotations of `selectors.saga_list`, computed on the database clock.
"""

from __future__ import annotations

import re
import uuid
from datetime import timedelta

import django_filters
from django import forms
from django.db import connections
from django.db.models import Q, TextField
from django.db.models.functions import Cast, Upper
from drf_spectacular.utils import extend_schema_field

from sagaplatform.filters import BooleanFilter, DateTimeFilter, FilterSet, TextFilter
from sagaplatform.kernel.clock import db_now

from .definitions import DEFINITIONS, MODES
from .live import style_of
from .models import Saga, SagaStep, key_text

STUCK = "stuck"
RETRYING = "retrying"
STATE_CHOICES = [
    *Saga.State.choices,
    (STUCK, "stuck (parked, or a lease passed)"),
    (RETRYING, "a step waiting to retry"),
]
# The style each definition runs (orchestrated, parallel, tcc, choreography).
STYLE_OF_DEFINITION = {name: style_of(definition) for name, definition in DEFINITIONS.items()}
# Every step name of every definition (the `step` filter's choices).
STEP_NAMES = sorted({s.name for d in DEFINITIONS.values() for s in (*d.steps, *d.on_failure)})
# A step "where it went wrong or is now": in flight, or with an error recorded.
STEP_TROUBLE = Q(error__isnull=False) | Q(
    state__in=(
        SagaStep.State.RUNNING,
        SagaStep.State.RETRYING,
        SagaStep.State.COMPENSATING,
        SagaStep.State.CONFIRMING,
        SagaStep.State.FAILED,
        SagaStep.State.COMPENSATION_FAILED,
        SagaStep.State.CONFIRM_FAILED,
    )
)
UUID_RE = re.compile(r"^[0-9a-fA-F]{8}-?[0-9a-fA-F]{4}-?[0-9a-fA-F]{4}-?[0-9a-fA-F]{4}-?[0-9a-fA-F]{12}$")
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
        # No join, so no DISTINCT (which costs a sort of every match).
        choices=[(name, name) for name in DEFINITIONS],
        distinct=False,
        help_text="The saga definition's name.",
    )
    order_id = django_filters.UUIDFilter(
        field_name="context__order_id", method="filter_order", help_text="The saga of this order."
    )
    stuck = BooleanFilter(
        field_name="stuck", help_text="`true`: only stuck sagas (see `state=stuck`); `false`: only the others."
    )
    q = TextFilter(
        method="filter_q",
        max_length=200,
        help_text="Search: a saga id or order id (a full UUID), else a customer (e-mail or id) or a SKU, exactly.",
    )
    customer = TextFilter(
        method="filter_customer", max_length=254, help_text="The customer: e-mail (any case) or user id."
    )
    sku = TextFilter(method="filter_sku", max_length=64, help_text="Sagas whose order has this SKU.")
    failure_code = TextFilter(
        method="filter_failure_code",
        max_length=64,
        help_text="Why it failed or was cancelled: `failure.code`, e.g. `card_declined`, `retries_exhausted`.",
    )
    step = django_filters.ChoiceFilter(
        choices=[(name, name) for name in STEP_NAMES],
        method="filter_step",
        help_text="Sagas where this step went wrong or is now: in flight, or with an error recorded (any "
        "attempt failed or timed out). With `step_state`: where this step is in that state instead.",
    )
    step_state = django_filters.MultipleChoiceFilter(
        choices=SagaStep.State.choices,
        method="filter_step_state",
        help_text="Sagas with a step in any of these states (repeat for several), e.g. `compensation_failed`; "
        "with `step`, that step.",
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
        # The text of the key, which the `saga_order_id` expression index serves.
        return queryset.alias(order_key=key_text("context__order_id")).filter(order_key=str(value))

    def filter_q(self, queryset, name, value):
        value = value.strip()
        if not value:
            return queryset
        if UUID_RE.match(value):
            key = uuid.UUID(value)
            return queryset.alias(order_key=key_text("context__order_id")).filter(Q(id=key) | Q(order_key=str(key)))
        return queryset.filter(Q(pk__in=self._customer(queryset, value)) | Q(pk__in=self._sku(queryset, value)))

    def filter_customer(self, queryset, name, value):
        value = value.strip()
        return queryset.filter(pk__in=self._customer(queryset, value)) if value else queryset

    def filter_sku(self, queryset, name, value):
        value = value.strip()
        return queryset.filter(pk__in=self._sku(queryset, value)) if value else queryset

    @staticmethod
    def _customer(queryset, value):
        sagas = Saga.objects.using(queryset.db).alias(
            email=Upper(key_text("context__customer_email")), customer=key_text("context__customer_id")
        )
        return sagas.filter(Q(email=value.upper()) | Q(customer=value)).values("pk")

    @staticmethod
    def _sku(queryset, value):
        sagas = Saga.objects.using(queryset.db)
        if connections[queryset.db].vendor == "postgresql":
            # jsonb containment, which the `saga_context_gin` index serves (PostgreSQL only).
            return sagas.filter(context__items__contains=[{"sku": value}]).values("pk")
        # SQLite (embedded mode) has no containment: match the stored JSON text.
        text = '"sku": ' + json_string(value)
        return sagas.alias(text=Cast("context", TextField())).filter(text__contains=text).values("pk")

    def filter_failure_code(self, queryset, name, value):
        value = value.strip()
        if not value:
            return queryset
        return queryset.alias(failure_code=key_text("failure__code")).filter(failure_code=value)

    def filter_step(self, queryset, name, value):
        # The few matching steps first (indexes `saga_step_name_state`, `saga_step_name_error`),
        # then their sagas: not a probe of every saga's steps.
        steps = SagaStep.objects.using(queryset.db).filter(name=value)
        wanted = self.form.cleaned_data.get("step_state")
        steps = steps.filter(state__in=wanted) if wanted else steps.filter(STEP_TROUBLE)
        return queryset.filter(pk__in=steps.values("saga_id"))

    def filter_step_state(self, queryset, name, values):
        if not values or self.form.cleaned_data.get("step"):
            return queryset  # with a step: read by filter_step
        steps = SagaStep.objects.using(queryset.db).filter(state__in=values)
        return queryset.filter(pk__in=steps.values("saga_id"))

    def filter_older_than(self, queryset, name, value):
        return queryset.filter(created_at__lte=db_now(queryset.db) - timedelta(seconds=value))

    def filter_newer_than(self, queryset, name, value):
        return queryset.filter(created_at__gt=db_now(queryset.db) - timedelta(seconds=value))


def json_string(value: str) -> str:
    import json

    return json.dumps(value)
