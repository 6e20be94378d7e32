"""Fault-injection endpoints (staff only): `GET/POST /api/faults/`, `DELETE /api/faults/<service>/<id>/`."""

from __future__ import annotations

from django.conf import settings
from drf_spectacular.utils import extend_schema
from rest_framework import serializers, status
from rest_framework.exceptions import NotFound
from rest_framework.permissions import IsAdminUser
from rest_framework.response import Response
from rest_framework.views import APIView

from . import faults
from .models import FaultRule


class FaultRuleSerializer(serializers.ModelSerializer):
    service = serializers.ChoiceField(choices=[(s, s) for s in settings.SERVICE_ALIASES])
    failure_rate = serializers.FloatField(min_value=0.0, max_value=1.0, required=False)
    hang_seconds = serializers.FloatField(min_value=0.0, max_value=600.0, required=False)
    latency_ms = serializers.IntegerField(min_value=0, max_value=60_000, required=False)

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


class FaultsApi(APIView):
    permission_classes = [IsAdminUser]

    @extend_schema(operation_id="faults_list", responses={200: FaultRuleSerializer(many=True)})
    def get(self, request):
        rules = [rule for alias in settings.SERVICE_ALIASES for rule in FaultRule.objects.using(alias).all()]
        return Response(FaultRuleSerializer(rules, many=True).data)

    @extend_schema(operation_id="faults_create", request=FaultRuleSerializer, responses={201: FaultRuleSerializer})
    def post(self, request):
        serializer = FaultRuleSerializer(data=request.data)
        serializer.is_valid(raise_exception=True)
        rule = FaultRule.objects.using(serializer.validated_data["service"]).create(**serializer.validated_data)
        faults.clear_cache()
        return Response(FaultRuleSerializer(rule).data, status=status.HTTP_201_CREATED)


class FaultDetailApi(APIView):
    permission_classes = [IsAdminUser]

    @extend_schema(operation_id="faults_delete", responses={204: None})
    def delete(self, request, service: str, rule_id: int):
        if (
            service not in settings.SERVICE_ALIASES
            or not FaultRule.objects.using(service).filter(id=rule_id).delete()[0]
        ):
            raise NotFound("No such fault rule.")
        faults.clear_cache()
        return Response(status=status.HTTP_204_NO_CONTENT)
