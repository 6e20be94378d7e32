"""Saga endpoints for operators (staff with `operate_saga`): list, detail, retry, skip."""

from __future__ import annotations

from drf_spectacular.utils import OpenApiParameter, extend_schema, extend_schema_serializer
from rest_framework import serializers, status
from rest_framework.exceptions import NotFound
from rest_framework.response import Response
from rest_framework.views import APIView

from sagaplatform.api import ErrorSerializer, SagaStepSerializer

from . import engine, selectors
from .models import Saga
from .permissions import IsOperator


def actor_of(request) -> str:
    return f"user:{request.user.get_username()}"


class SagaSummarySerializer(serializers.Serializer):
    id = serializers.UUIDField()
    definition = serializers.CharField()
    state = serializers.CharField()
    failure = serializers.JSONField(allow_null=True)
    version = serializers.IntegerField()
    created_at = serializers.DateTimeField()
    finished_at = serializers.DateTimeField(allow_null=True)


class SagaEventSerializer(serializers.Serializer):
    seq = serializers.IntegerField()
    step = serializers.CharField()
    kind = serializers.CharField()
    from_state = serializers.CharField()
    to_state = serializers.CharField()
    data = serializers.JSONField()
    actor = serializers.CharField()
    created_at = serializers.DateTimeField()


class SagaListApi(APIView):
    permission_classes = [IsOperator]

    @extend_schema(
        operation_id="sagas_list",
        parameters=[OpenApiParameter("state", str, enum=[s for s, _ in Saga.State.choices])],
        responses={200: SagaSummarySerializer(many=True), 400: ErrorSerializer},
    )
    def get(self, request):
        sagas = selectors.saga_list()
        state = request.query_params.get("state")
        if state:
            if state not in Saga.State.values:
                raise serializers.ValidationError({"state": f"one of {', '.join(Saga.State.values)}"})
            sagas = sagas.filter(state=state)
        return Response(SagaSummarySerializer(sagas[:200], many=True).data)


class SagaDetailApi(APIView):
    permission_classes = [IsOperator]

    @extend_schema_serializer(component_name="SagaDetail")
    class OutputSerializer(SagaSummarySerializer):
        context = serializers.JSONField()
        deadline_at = serializers.DateTimeField(allow_null=True)
        steps = SagaStepSerializer(many=True)
        events = SagaEventSerializer(many=True)

    @extend_schema(operation_id="sagas_retrieve", responses={200: OutputSerializer, 404: ErrorSerializer})
    def get(self, request, saga_id):
        saga = selectors.saga_get(saga_id=saga_id)
        if saga is None:
            raise NotFound("No such saga.")
        summary = selectors.saga_summary(saga.id)
        data = {
            **summary,
            "version": saga.version,
            "context": saga.context,
            "deadline_at": saga.deadline_at,
            "events": list(saga.events.order_by("seq")),
        }
        return Response(self.OutputSerializer(data).data)


class SagaRetryApi(APIView):
    permission_classes = [IsOperator]

    @extend_schema_serializer(component_name="SagaRetryRequest")
    class InputSerializer(serializers.Serializer):
        reason = serializers.CharField(max_length=500, required=False, allow_blank=True, default="")

    @extend_schema(
        operation_id="sagas_retry",
        request=InputSerializer,
        responses={202: SagaSummarySerializer, 404: ErrorSerializer, 409: ErrorSerializer},
    )
    def post(self, request, saga_id):
        serializer = self.InputSerializer(data=request.data)
        serializer.is_valid(raise_exception=True)
        saga = engine.saga_retry(saga_id=saga_id, actor=actor_of(request), reason=serializer.validated_data["reason"])
        return Response(SagaSummarySerializer(saga).data, status=status.HTTP_202_ACCEPTED)


class SagaSkipApi(APIView):
    permission_classes = [IsOperator]

    @extend_schema_serializer(component_name="SagaSkipRequest")
    class InputSerializer(serializers.Serializer):
        step = serializers.CharField(max_length=64)
        reason = serializers.CharField(max_length=500)

    @extend_schema(
        operation_id="sagas_skip",
        request=InputSerializer,
        responses={202: SagaSummarySerializer, 400: ErrorSerializer, 404: ErrorSerializer, 409: ErrorSerializer},
    )
    def post(self, request, saga_id):
        serializer = self.InputSerializer(data=request.data)
        serializer.is_valid(raise_exception=True)
        saga = engine.saga_skip(
            saga_id=saga_id,
            step_name=serializer.validated_data["step"],
            actor=actor_of(request),
            reason=serializer.validated_data["reason"],
        )
        return Response(SagaSummarySerializer(saga).data, status=status.HTTP_202_ACCEPTED)
