"""Fault-injection endpoints (staff with the fault rule permissions): `GET/POST /api/faults/`,
`DELETE /api/faults/<service>/<id>/`. Refused with `403 fault_injection_disabled` unless
SAGA_FAULT_INJECTION is on (by default only with DEBUG)."""

from __future__ import annotations

from typing import Any

from django.conf import settings
from django.db import models
from drf_spectacular.types import OpenApiTypes
from drf_spectacular.utils import OpenApiExample, OpenApiParameter, extend_schema, extend_schema_view
from rest_framework import generics, serializers, status
from rest_framework.exceptions import NotFound, PermissionDenied
from rest_framework.permissions import BasePermission
from rest_framework.request import Request
from rest_framework.response import Response
from rest_framework.views import APIView

from sagaplatform.api import (
    LIST_ERROR_EXAMPLES,
    StrictBooleanField,
    StrictCharField,
    StrictChoiceField,
    StrictFloatField,
    StrictIntegerField,
    error_responses,
)

from . import faults
from .models import FaultRule


class FaultRuleSerializer(serializers.ModelSerializer[FaultRule]):
    # Every field takes only its documented JSON type (`"is_enabled": "yes"` is refused).
    serializer_field_mapping = {
        **serializers.ModelSerializer.serializer_field_mapping,
        models.CharField: StrictCharField,
        models.FloatField: StrictFloatField,
        models.PositiveIntegerField: StrictIntegerField,
        models.BooleanField: StrictBooleanField,
    }
    serializer_choice_field = StrictChoiceField

    service = StrictChoiceField(choices=[(s, s) for s in settings.SERVICE_ALIASES])
    failure_rate = StrictFloatField(
        min_value=0.0, max_value=1.0, required=False, help_text="Share of attempts failing transiently, 0 to 1."
    )
    hang_seconds = StrictFloatField(
        min_value=0.0, max_value=600.0, required=False, help_text="Block this long before the work."
    )
    latency_ms = StrictIntegerField(
        min_value=0, max_value=60_000, required=False, help_text="Milliseconds added before the work."
    )

    class Meta:
        model = FaultRule
        fields = [
            "id",
            "service",
            "operation",
            "failure_rate",
            "fail_first",
            "latency_ms",
            "hang_seconds",
            "crash_point",
            "crashes_left",
            "is_enabled",
            "created_at",
        ]
        read_only_fields = ["id", "created_at"]
        extra_kwargs = {
            "id": {"help_text": "The rule's id in its service's database."},
            "service": {"help_text": "The service whose operations the rule breaks."},
            "crash_point": {"help_text": "Kill the process (SIGKILL) at this point of the operation, if set."},
            "crashes_left": {"help_text": "How many more times to crash; 0 = spent."},
            "is_enabled": {"help_text": "A disabled rule does nothing."},
            "created_at": {"help_text": "When the rule was added."},
        }


class CanManageFaults(BasePermission):
    """Staff with the fault rule model permissions: `kernel.view_faultrule` to list, `add_` to
    create, `delete_` to delete (superusers have them all). Injecting faults breaks orders on
    purpose, so being staff is not enough."""

    PERMISSIONS = {
        "GET": "kernel.view_faultrule",
        "HEAD": "kernel.view_faultrule",
        "OPTIONS": "kernel.view_faultrule",
        "POST": "kernel.add_faultrule",
        "DELETE": "kernel.delete_faultrule",
    }

    def has_permission(self, request: Request, view: Any) -> bool:
        user = request.user
        if not (user and user.is_authenticated and user.is_staff):
            return False
        if not settings.SAGA_FAULT_INJECTION:
            raise FaultInjectionDisabled()
        permission = self.PERMISSIONS.get(request.method or "")
        # Another method goes on to its 405.
        return permission is None or user.has_perm(permission)


class FaultInjectionDisabled(PermissionDenied):
    default_detail = "Fault injection is off on this deployment (SAGA_FAULT_INJECTION)."
    default_code = "fault_injection_disabled"


FAULT_EXAMPLE = {
    "id": 3,
    "service": "payments",
    "operation": "charge",
    "failure_rate": 0.2,
    "fail_first": 0,
    "latency_ms": 0,
    "hang_seconds": 0.0,
    "crash_point": "",
    "crashes_left": 1,
    "is_enabled": True,
    "created_at": "2026-11-22T10:00:00Z",
}


@extend_schema_view(
    get=extend_schema(
        operation_id="faults_list",
        tags=["faults"],
        summary="List fault rules",
        description="The fault rules of every service database.",
        responses={
            200: FaultRuleSerializer(many=True),
            **error_responses(400, 401, 403, 404, examples=LIST_ERROR_EXAMPLES),
        },
    )
)
class FaultsApi(generics.ListAPIView[FaultRule]):
    permission_classes = [CanManageFaults]
    serializer_class = FaultRuleSerializer
    # One list gathered from every service's database (each service keeps its own rules).
    filter_backends = []

    def get_queryset(self) -> list[FaultRule]:  # type: ignore[override]  # rows of several databases
        return [rule for alias in settings.SERVICE_ALIASES for rule in FaultRule.objects.using(alias).all()]

    @extend_schema(
        operation_id="faults_create",
        tags=["faults"],
        summary="Add a fault rule",
        description="Workers pick it up within a second. `manage.py faults` does the same from a shell.",
        request=FaultRuleSerializer,
        responses={201: FaultRuleSerializer, **error_responses(400, 401, 403, 413, 415)},
        examples=[
            OpenApiExample(
                "flaky payments",
                value={"service": "payments", "operation": "charge", "failure_rate": 0.2},
                request_only=True,
            ),
            OpenApiExample("created", value=FAULT_EXAMPLE, response_only=True, status_codes=["201"]),
        ],
    )
    def post(self, request: Request) -> Response:
        serializer = FaultRuleSerializer(data=request.data)
        serializer.is_valid(raise_exception=True)
        rule = FaultRule.objects.using(serializer.validated_data["service"]).create(**serializer.validated_data)
        faults.clear_cache()
        return Response(FaultRuleSerializer(rule).data, status=status.HTTP_201_CREATED)


class FaultDetailApi(APIView):
    permission_classes = [CanManageFaults]

    @extend_schema(
        operation_id="faults_delete",
        tags=["faults"],
        summary="Delete a fault rule",
        parameters=[
            OpenApiParameter(
                "service",
                OpenApiTypes.STR,
                OpenApiParameter.PATH,
                enum=list(settings.SERVICE_ALIASES),
                description="The service whose database holds the rule.",
            ),
            OpenApiParameter(
                "rule_id", OpenApiTypes.INT, OpenApiParameter.PATH, examples=[OpenApiExample("a rule", value=1)]
            ),
        ],
        responses={204: None, **error_responses(401, 403, 404)},
    )
    def delete(self, request: Request, service: str, rule_id: int) -> Response:
        if (
            service not in settings.SERVICE_ALIASES
            or not FaultRule.objects.using(service).filter(id=rule_id).delete()[0]
        ):
            raise NotFound("No such fault rule.")
        faults.clear_cache()
        return Response(status=status.HTTP_204_NO_CONTENT)
