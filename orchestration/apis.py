"""Saga endpoints for operators (staff with `orchestration.operate_saga`): list, detail, and the
audited actions retry, skip and cancel (each recorded in the saga's timeline with who and why)."""

from __future__ import annotations

from drf_spectacular.types import OpenApiTypes
from drf_spectacular.utils import (
    OpenApiExample,
    OpenApiParameter,
    extend_schema,
    extend_schema_serializer,
    extend_schema_view,
)
from rest_framework import generics, serializers, status
from rest_framework.exceptions import NotFound
from rest_framework.response import Response
from rest_framework.views import APIView

from sagaplatform.api import LIST_ERROR_EXAMPLES, SagaStepSerializer, StrictCharField, error_responses, operator_actor

from . import engine, selectors
from .filters import STYLE_OF_DEFINITION, SagaFilter
from .models import Saga
from .permissions import IsOperator

SAGA_ID = "b71e0d52-6a3f-4e89-a2c4-9d8f1e3b5a07"
ORDER_ID = "3f2c9a4e-8d1b-4c6a-9f0e-2b7d5a1c8e64"
SUMMARY_EXAMPLE = {
    "id": SAGA_ID,
    "definition": "place_order",
    "definition_version": "place_order v1",
    "definition_hash": "16e0e0e0a196c3f1a2b4d5e6f708192a3b4c5d6e7f8091a2b3c4d5e6f7081920",
    "style": "orchestrated",
    "order_id": ORDER_ID,
    "state": "parked",
    "stuck": True,
    "retrying": False,
    "failure": {"code": "card_declined", "message": "The card was declined"},
    "version": 14,
    "created_at": "2026-11-22T10:00:00.100Z",
    "finished_at": None,
}


SAGA_ID_PARAMETER = OpenApiParameter(
    "saga_id",
    OpenApiTypes.UUID,
    OpenApiParameter.PATH,
    description="The saga's id (an order's `saga.id`).",
    examples=[OpenApiExample("a saga", value=SAGA_ID)],
)


@extend_schema_serializer(
    component_name="SagaSummary",
    examples=[OpenApiExample("parked", value=SUMMARY_EXAMPLE, response_only=True)],
)
class SagaSummarySerializer(serializers.Serializer):
    """A saga read through `selectors.saga_list` (which adds `stuck` and `retrying`)."""

    id = serializers.UUIDField(help_text="The saga's id: every service's idempotency key for its work.")
    definition = serializers.CharField(help_text="The saga definition, e.g. `place_order_tcc`.")
    definition_version = serializers.CharField(
        source="definition_label",
        help_text="The version of the definition the saga runs, for its whole life (`place_order v2`); "
        "empty for a saga started before definitions were versioned.",
    )
    definition_hash = serializers.CharField(help_text="The content hash of that version's step graph.")
    style = serializers.SerializerMethodField(help_text="orchestrated, parallel, tcc or choreography.")
    order_id = serializers.SerializerMethodField(help_text="The order the saga runs.")
    state = serializers.ChoiceField(choices=Saga.State.choices)
    stuck = serializers.BooleanField(help_text="Not ended, and parked or with a step past its lease.")
    retrying = serializers.BooleanField(help_text="Not ended, with a step waiting out a backoff.")
    failure = serializers.JSONField(allow_null=True, help_text="Why it failed or was cancelled: `{code, message}`.")
    version = serializers.IntegerField(help_text="The number of events recorded so far.")
    created_at = serializers.DateTimeField(help_text="When the saga started.")
    finished_at = serializers.DateTimeField(allow_null=True, help_text="When it ended; null while it runs.")

    def get_style(self, saga) -> str:
        return STYLE_OF_DEFINITION.get(saga.definition, "")

    def get_order_id(self, saga) -> str | None:
        return (saga.context or {}).get("order_id")


class SagaEventSerializer(serializers.Serializer):
    seq = serializers.IntegerField(help_text="1, 2, 3, ... in the order the events happened.")
    step = serializers.CharField(help_text="The step concerned, or empty for the saga itself.")
    kind = serializers.CharField(help_text="e.g. step_started, step_succeeded, operator_retry.")
    from_state = serializers.CharField(help_text="The step's (or saga's) state before, if it changed.")
    to_state = serializers.CharField(help_text="The step's (or saga's) state after.")
    data = serializers.JSONField(help_text="Details: attempt, error, reason, ...")
    actor = serializers.CharField(help_text="`engine`, or who acted: `user:<name>`, `customer:<name>`.")
    created_at = serializers.DateTimeField(help_text="When it happened (database clock).")


def _summary(saga_id) -> Saga:
    return selectors.saga_list().get(id=saga_id)


ACTION_ERRORS = (400, 401, 403, 404, 409, 413, 415)
# Every saga endpoint answers an unknown saga alike, as every other endpoint answers an unknown id.
SAGA_NOT_FOUND = [("not_found", "No such saga.")]


@extend_schema_view(
    get=extend_schema(
        operation_id="sagas_list",
        tags=["sagas"],
        summary="List sagas",
        description="Every saga, newest first, with filters to find those that need an operator.",
        responses={
            200: SagaSummarySerializer(many=True),
            **error_responses(400, 401, 403, 404, examples=LIST_ERROR_EXAMPLES),
        },
    )
)
class SagaListApi(generics.ListAPIView):
    permission_classes = [IsOperator]
    serializer_class = SagaSummarySerializer
    filterset_class = SagaFilter

    def get_queryset(self):
        return selectors.saga_list()


class SagaDetailApi(APIView):
    permission_classes = [IsOperator]

    @extend_schema_serializer(component_name="SagaDetail")
    class OutputSerializer(SagaSummarySerializer):
        context = serializers.JSONField(help_text="What the saga was started with (order, items, amount, ...).")
        deadline_at = serializers.DateTimeField(allow_null=True, help_text="The global deadline, while it applies.")
        steps = SagaStepSerializer(many=True, source="step_views", help_text="In definition order.")
        events = SagaEventSerializer(many=True, source="timeline", help_text="The full timeline, oldest first.")

    @extend_schema(
        operation_id="sagas_retrieve",
        tags=["sagas"],
        summary="Read a saga",
        parameters=[SAGA_ID_PARAMETER],
        description="The saga with its steps (definition order) and its full event timeline.",
        responses={200: OutputSerializer, **error_responses(401, 403, 404, examples={404: SAGA_NOT_FOUND})},
    )
    def get(self, request, saga_id):
        saga = selectors.saga_list().filter(id=saga_id).first()
        if saga is None:
            raise NotFound("No such saga.")
        saga.step_views = selectors.saga_summary(saga.id)["steps"]
        saga.timeline = saga.events.order_by("seq")
        return Response(self.OutputSerializer(saga).data)


class SagaRetryApi(APIView):
    permission_classes = [IsOperator]

    @extend_schema_serializer(
        component_name="SagaRetry",
        examples=[OpenApiExample("fixed", value={"reason": "payment gateway back up"}, request_only=True)],
    )
    class InputSerializer(serializers.Serializer):
        reason = StrictCharField(
            max_length=500, required=False, allow_blank=True, default="", help_text="Recorded in the timeline."
        )

    @extend_schema(
        operation_id="sagas_retry",
        tags=["sagas"],
        summary="Retry a parked or stuck saga",
        parameters=[SAGA_ID_PARAMETER],
        description=(
            "Resume a parked saga from where it stopped (TCC: send the confirms again; choreography: "
            "publish again the events of the steps that stopped), or give every step waiting out a "
            "backoff its next attempt now."
        ),
        request=InputSerializer,
        responses={
            202: SagaSummarySerializer,
            **error_responses(
                *ACTION_ERRORS,
                examples={
                    404: SAGA_NOT_FOUND,
                    409: [
                        ("saga_not_stuck", "Saga is running with no step waiting to retry"),
                        ("saga_not_retryable", "A completed saga cannot be retried"),
                    ],
                },
            ),
        },
    )
    def post(self, request, saga_id):
        serializer = self.InputSerializer(data=request.data)
        serializer.is_valid(raise_exception=True)
        saga = engine.saga_retry(
            saga_id=saga_id, actor=operator_actor(request.user), reason=serializer.validated_data["reason"]
        )
        return Response(SagaSummarySerializer(_summary(saga.id)).data, status=status.HTTP_202_ACCEPTED)


class SagaSkipApi(APIView):
    permission_classes = [IsOperator]

    @extend_schema_serializer(
        component_name="SagaSkip",
        examples=[
            OpenApiExample(
                "refunded by hand",
                value={"step": "charge_payment", "reason": "refunded by hand, ticket 42"},
                request_only=True,
            )
        ],
    )
    class InputSerializer(serializers.Serializer):
        step = StrictCharField(max_length=64, help_text="The step whose compensation gave up.")
        reason = StrictCharField(max_length=500, help_text="Required: what was done by hand, and why.")

    @extend_schema(
        operation_id="sagas_skip",
        tags=["sagas"],
        summary="Skip a parked compensation",
        parameters=[SAGA_ID_PARAMETER],
        description=(
            "Settle a compensation that gave up, after fixing it by hand: the step is marked skipped "
            "and the saga goes on compensating the rest. A reason is required."
        ),
        request=InputSerializer,
        responses={
            202: SagaSummarySerializer,
            **error_responses(
                *ACTION_ERRORS,
                examples={
                    404: SAGA_NOT_FOUND,
                    409: [("nothing_to_skip", "Step 'reserve_stock' is not a parked compensation of this saga")],
                },
            ),
        },
    )
    def post(self, request, saga_id):
        serializer = self.InputSerializer(data=request.data)
        serializer.is_valid(raise_exception=True)
        saga = engine.saga_skip(
            saga_id=saga_id,
            step_name=serializer.validated_data["step"],
            actor=operator_actor(request.user),
            reason=serializer.validated_data["reason"],
        )
        return Response(SagaSummarySerializer(_summary(saga.id)).data, status=status.HTTP_202_ACCEPTED)


class SagaCancelApi(APIView):
    permission_classes = [IsOperator]

    @extend_schema_serializer(
        component_name="SagaCancel",
        examples=[OpenApiExample("fraud", value={"reason": "fraud suspected, ticket 7"}, request_only=True)],
    )
    class InputSerializer(serializers.Serializer):
        reason = StrictCharField(
            max_length=500, help_text="Required: recorded in the timeline and told to the customer."
        )

    @extend_schema(
        operation_id="sagas_cancel",
        tags=["sagas"],
        summary="Cancel a saga (and its order)",
        parameters=[SAGA_ID_PARAMETER],
        description=(
            "As a customer's cancel: nothing more is started, steps in flight finish, and what "
            "succeeded is undone; the order then ends `cancelled` with the reason. Refused (409) after "
            "the point of no return and for a saga that already ended."
        ),
        request=InputSerializer,
        responses={
            202: SagaSummarySerializer,
            **error_responses(
                *ACTION_ERRORS,
                examples={
                    404: SAGA_NOT_FOUND,
                    409: [
                        ("already_shipped", "The order has shipped; it can no longer be cancelled"),
                        ("shipment_in_progress", "The parcel is leaving the warehouse right now"),
                        ("already_cancelled", "This order is already cancelled"),
                        ("not_cancellable", "This order can no longer be cancelled (it is completed)"),
                    ],
                },
            ),
        },
    )
    def post(self, request, saga_id):
        serializer = self.InputSerializer(data=request.data)
        serializer.is_valid(raise_exception=True)
        saga = selectors.saga_get(saga_id=saga_id)
        if saga is None:
            raise NotFound("No such saga.")
        engine.saga_cancel(
            saga_id=saga.id,
            context=saga.context,
            actor=operator_actor(request.user),
            reason=serializer.validated_data["reason"],
        )
        return Response(SagaSummarySerializer(_summary(saga.id)).data, status=status.HTTP_202_ACCEPTED)
