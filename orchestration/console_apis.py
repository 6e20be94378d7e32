"""The operator console's endpoints: search over the whole history (in the live feed's shape),
bulk actions, export (a saga as JSON, a filtered list as CSV) and saved views.

Reading (search, export, saved views) is for staff, as the dashboard is; acting (bulk) needs
`orchestration.operate_saga`, as every single action does.
"""

from __future__ import annotations

import re
from typing import Any

from django.contrib.auth.models import User
from django.db import IntegrityError, transaction
from django.db.models import Prefetch
from django.http import JsonResponse, QueryDict, StreamingHttpResponse
from drf_spectacular.types import OpenApiTypes
from drf_spectacular.utils import OpenApiExample, OpenApiResponse, extend_schema, extend_schema_view
from rest_framework import generics, serializers, status
from rest_framework.exceptions import NotAuthenticated, NotFound, ValidationError
from rest_framework.request import Request
from rest_framework.response import Response
from rest_framework.views import APIView

from sagaplatform.api import (
    LIST_ERROR_EXAMPLES,
    ApiError,
    StrictBooleanField,
    StrictCharField,
    StrictChoiceField,
    error_responses,
    operator_actor,
)
from sagaplatform.kernel.clock import db_now

from . import bulk, export, live, selectors
from .apis import SAGA_ID_PARAMETER, SAGA_NOT_FOUND
from .filters import STEP_NAMES, SagaFilter
from .models import SagaStep, SavedView
from .permissions import IsOperator, IsStaff

DB = "default"


def filtered(query: str | QueryDict, *, field: str | None = None):
    """The sagas a filter query string matches, or a 400 naming each bad filter."""
    data = query if isinstance(query, QueryDict) else QueryDict(query)
    filterset = SagaFilter(data=data, queryset=selectors.saga_list())
    if not filterset.is_valid():
        errors = {name: [str(e) for e in errs] for name, errs in filterset.errors.items()}
        raise ValidationError({field: errors} if field else errors)
    return filterset.qs


# --- search, in the live feed's shape ------------------------------------------------------------


class SagaHeaderSerializer(serializers.Serializer):
    """A saga as the live feed sends it (docs/LIVE_FEED.md): the dashboard merges both."""

    def to_representation(self, saga):
        return live.saga_header(saga, saga.steps.all(), now=self.context["now"])


@extend_schema_view(
    get=extend_schema(
        operation_id="sagas_search",
        tags=["sagas"],
        summary="Search the whole history (the dashboard's list)",
        description=(
            "The same filters as `GET /api/sagas/`, each saga in the live feed's header shape "
            "(steps done, active step, ...), newest first, paginated. Staff only."
        ),
        responses={
            200: OpenApiResponse(OpenApiTypes.OBJECT, description="A page of saga headers."),
            **error_responses(400, 401, 403, 404, examples=LIST_ERROR_EXAMPLES),
        },
    )
)
class SagaSearchApi(generics.ListAPIView):
    permission_classes = [IsStaff]
    serializer_class = SagaHeaderSerializer
    filterset_class = SagaFilter

    def get_queryset(self):
        return selectors.saga_list().prefetch_related(Prefetch("steps", queryset=SagaStep.objects.using(DB).all()))

    def get_serializer_context(self):
        return {**super().get_serializer_context(), "now": db_now(DB)}


# --- bulk actions ---------------------------------------------------------------------------------


class StrictUUIDField(serializers.UUIDField):
    """A JSON string in the canonical form `8-4-4-4-12` (DRF would also take an integer, or hex
    without dashes)."""

    CANONICAL = re.compile(r"\A[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}\Z")

    def to_internal_value(self, data):
        if not isinstance(data, str) or not self.CANONICAL.match(data):
            self.fail("invalid", value=data)
        return super().to_internal_value(data)


class BulkInputSerializer(serializers.Serializer):
    action = StrictChoiceField(choices=bulk.ACTIONS, help_text="retry, cancel or skip.")
    ids = serializers.ListField(
        child=StrictUUIDField(),
        required=False,
        min_length=1,
        max_length=bulk.MAX_IDS,
        help_text=f"The sagas (at most {bulk.MAX_IDS}). With `filter` too: those of them that match it; "
        "with neither, no saga.",
    )
    filter = StrictCharField(
        required=False,
        max_length=2000,
        allow_blank=True,
        help_text="Every saga matching this query string of `GET /api/sagas/` filters, e.g. `state=parked` "
        "(an empty string: every saga).",
    )
    reason = StrictCharField(
        required=False,
        allow_blank=True,
        default="",
        max_length=500,
        help_text="One reason, recorded in each saga's timeline. A skip without one is refused for each "
        "saga (`reason_required`), as a single skip is; a cancel without one records "
        '"Cancelled by an operator".',
    )
    step = StrictChoiceField(
        choices=STEP_NAMES,
        required=False,
        help_text="skip: only this step's parked compensation (default: every parked compensation).",
    )
    dry_run = StrictBooleanField(
        default=False, help_text="true: only say which sagas are eligible and why the others are not."
    )


BULK_PREVIEW_EXAMPLE = {
    "action": "retry",
    "dry_run": True,
    "count": 3,
    "eligible": ["b71e0d52-6a3f-4e89-a2c4-9d8f1e3b5a07", "0e3c7a1b-5d2f-4b8e-9c6a-1f7d3e5b9a20"],
    "ineligible": [
        {
            "id": "7a9d2c4e-1b3f-4e8a-b6c5-d0e2f4a6b8c1",
            "code": "saga_not_retryable",
            "message": "A completed saga cannot be retried",
            "state": "completed",
        }
    ],
}
BULK_RESULT_EXAMPLE: dict[str, Any] = {
    "action": "retry",
    "dry_run": False,
    "count": 2,
    "succeeded": 1,
    "refused": 1,
    "results": [
        {
            "id": "b71e0d52-6a3f-4e89-a2c4-9d8f1e3b5a07",
            "ok": True,
            "code": "accepted",
            "message": "Retrying.",
            "state": "running",
        },
        {
            "id": "0e3c7a1b-5d2f-4b8e-9c6a-1f7d3e5b9a20",
            "ok": False,
            "code": "saga_not_stuck",
            "message": "Saga is running with no step waiting to retry",
        },
    ],
}


class SagaBulkApi(APIView):
    permission_classes = [IsOperator]

    @extend_schema(
        operation_id="sagas_bulk",
        tags=["sagas"],
        summary="Retry, cancel or skip many sagas",
        description=(
            "With `dry_run`, nothing changes: the answer lists the eligible sagas and, for the others, "
            "why not (the codes of the single actions). Otherwise each saga is acted on in its own "
            "transaction under its row lock and the answer reports each one's outcome: a saga that "
            "changed meanwhile (another operator acted first) is refused with the engine's reason, never "
            f"acted on twice. At most {bulk.MAX_IDS} sagas per request (a `filter` matching more is a 409 "
            f"`too_many_sagas`; with `dry_run`, up to {bulk.MAX_MATCHED}); each saga's timeline records the action."
        ),
        request=BulkInputSerializer,
        examples=[
            OpenApiExample(
                "preview", value={"action": "retry", "filter": "state=parked", "dry_run": True}, request_only=True
            ),
            OpenApiExample(
                "retry",
                value={"action": "retry", "ids": [BULK_RESULT_EXAMPLE["results"][0]["id"]], "reason": "gateway up"},
                request_only=True,
            ),
            OpenApiExample("preview answer", value=BULK_PREVIEW_EXAMPLE, response_only=True),
            OpenApiExample("results", value=BULK_RESULT_EXAMPLE, response_only=True),
        ],
        responses={
            200: OpenApiResponse(OpenApiTypes.OBJECT, description="The preview, or each saga's outcome."),
            **error_responses(
                400,
                401,
                403,
                409,
                413,
                415,
                examples={409: [("too_many_sagas", "The filter matches more than 500 sagas: narrow it.")]},
            ),
        },
    )
    def post(self, request):
        serializer = BulkInputSerializer(data=request.data)
        serializer.is_valid(raise_exception=True)
        data = serializer.validated_data
        action, dry_run = data["action"], data["dry_run"]
        ids = list(dict.fromkeys(str(i) for i in data.get("ids", [])))
        if "filter" in data:
            matches = filtered(data["filter"], field="filter")
            if ids:  # the chosen sagas that (still) match
                matched = {str(i) for i in matches.filter(id__in=ids).values_list("id", flat=True)}
                ids = [i for i in ids if i in matched]
            else:
                limit = bulk.MAX_MATCHED if dry_run else bulk.MAX_IDS
                ids = [str(i) for i in matches.values_list("id", flat=True)[: limit + 1]]
                if len(ids) > limit:
                    raise TooMany(limit)
        step = data.get("step")
        if dry_run:
            verdicts = bulk.preview(ids, action, step=step)
            return Response({"action": action, "dry_run": True, "count": len(ids), **verdicts})
        results = bulk.apply(ids, action, actor=operator_actor(request.user), reason=data["reason"], step=step)
        succeeded = sum(1 for r in results if r["ok"])
        return Response(
            {
                "action": action,
                "dry_run": False,
                "count": len(results),
                "succeeded": succeeded,
                "refused": len(results) - succeeded,
                "results": results,
            }
        )


class TooMany(ApiError):
    """How many sagas a filter matches is the server's state, not the request's form: 409."""

    status = status.HTTP_409_CONFLICT
    code = "too_many_sagas"

    def __init__(self, limit: int) -> None:
        super().__init__(
            f"The filter matches more than {limit} sagas: narrow it, or preview it (dry_run) and send the ids "
            f"in chunks of at most {bulk.MAX_IDS}.",
            details={"limit": limit},
        )


# --- export ---------------------------------------------------------------------------------------


class SagaExportApi(APIView):
    permission_classes = [IsStaff]

    @extend_schema(
        operation_id="sagas_export",
        tags=["sagas"],
        summary="Export a saga (JSON)",
        parameters=[SAGA_ID_PARAMETER],
        description=(
            "The saga, each step with its input (secrets such as the payment token masked), result, "
            "error and attempt history, and the full timeline. `?download=1` adds a "
            "`Content-Disposition: attachment`. Staff only."
        ),
        responses={
            200: OpenApiResponse(OpenApiTypes.OBJECT, description="The saga, its steps and its timeline."),
            **error_responses(401, 403, 404, examples={404: SAGA_NOT_FOUND}),
        },
    )
    def get(self, request, saga_id):
        saga = selectors.saga_get(saga_id=saga_id)
        if saga is None:
            raise NotFound("No such saga.")
        response = JsonResponse(export.saga_export(saga), json_dumps_params={"indent": 2})
        if request.query_params.get("download"):
            response["Content-Disposition"] = f'attachment; filename="saga-{saga.id}.json"'
        return response


class SagaCsvApi(generics.GenericAPIView):
    permission_classes = [IsStaff]
    filterset_class = SagaFilter
    pagination_class = None

    def get_queryset(self):
        return selectors.saga_list()

    @extend_schema(
        operation_id="sagas_export_csv",
        tags=["sagas"],
        summary="Export the sagas matching the filters (CSV)",
        description=(
            "Every saga matching the filters of `GET /api/sagas/` (all pages), newest first, one row "
            f"each: {', '.join(export.CSV_COLUMNS)}. Staff only."
        ),
        responses={
            (200, "text/csv"): OpenApiResponse(OpenApiTypes.STR, description="The CSV file."),
            **error_responses(400, 401, 403, examples=LIST_ERROR_EXAMPLES),
        },
    )
    def get(self, request):
        sagas = self.filter_queryset(self.get_queryset()).only(
            "id", "definition", "state", "context", "failure", "version", "created_at", "finished_at"
        )
        response = StreamingHttpResponse(export.csv_rows(sagas.iterator(chunk_size=1000)), content_type="text/csv")
        response["Content-Disposition"] = 'attachment; filename="sagas.csv"'
        return response


# --- saved views ----------------------------------------------------------------------------------


class SavedViewSerializer(serializers.ModelSerializer):
    id = serializers.IntegerField(read_only=True, help_text="The view's id (for DELETE).")
    created_at = serializers.DateTimeField(read_only=True, help_text="When it was saved.")
    name = StrictCharField(max_length=80, help_text="Your name for it (unique among your views).")
    query = StrictCharField(
        max_length=2000, allow_blank=True, help_text="The filters, as the dashboard's URL query string."
    )

    class Meta:
        model = SavedView
        fields = ["id", "name", "query", "created_at"]
        read_only_fields = ["id", "created_at"]

    def validate_query(self, value):
        filtered(value.lstrip("?"))  # a 400 naming the bad filter, rather than a view that cannot load
        return value.lstrip("?")


def _signed_in(request: Request) -> User:
    """The request's user: IsStaff lets no anonymous user through."""
    user = request.user
    if not user.is_authenticated:
        raise NotAuthenticated()
    return user


@extend_schema_view(
    get=extend_schema(
        operation_id="saga_views_list",
        tags=["sagas"],
        summary="Your saved dashboard views",
        responses={200: SavedViewSerializer(many=True), **error_responses(401, 403)},
    ),
    post=extend_schema(
        operation_id="saga_views_create",
        tags=["sagas"],
        summary="Save a dashboard view",
        responses={201: SavedViewSerializer, **error_responses(400, 401, 403, 409, 413, 415)},
    ),
)
class SavedViewListApi(generics.ListCreateAPIView):
    permission_classes = [IsStaff]
    serializer_class = SavedViewSerializer
    pagination_class = None

    def get_queryset(self):
        if getattr(self, "swagger_fake_view", False):  # the schema generation, with no user
            return SavedView.objects.none()
        return SavedView.objects.using(DB).filter(user=_signed_in(self.request))

    def perform_create(self, serializer):
        try:
            with transaction.atomic(using=DB):
                serializer.save(user=_signed_in(self.request))
        except IntegrityError:
            raise ViewExists(serializer.validated_data["name"]) from None


class ViewExists(ApiError):
    status = status.HTTP_409_CONFLICT
    code = "view_exists"

    def __init__(self, name: str) -> None:
        super().__init__(f"You already have a view named {name!r}: delete it first, or pick another name.")


@extend_schema_view(
    delete=extend_schema(
        operation_id="saga_views_delete",
        tags=["sagas"],
        summary="Delete a saved view",
        responses={204: None, **error_responses(401, 403, 404)},
    ),
)
class SavedViewDetailApi(generics.DestroyAPIView):
    permission_classes = [IsStaff]
    serializer_class = SavedViewSerializer
    lookup_url_kwarg = "view_id"

    def get_queryset(self):
        if getattr(self, "swagger_fake_view", False):  # the schema generation, with no user
            return SavedView.objects.none()
        return SavedView.objects.using(DB).filter(user=_signed_in(self.request))
