"""Alert channels and notifications for operators (staff with `orchestration.operate_saga`).

`/api/alerts/channels/`: list and create channels (e-mail addresses or an http(s) webhook);
`/api/alerts/channels/<id>/`: read, change (PATCH) or delete one. A webhook's signing secret is
shown in full once, in the answer that created it (generated when none is given), and masked
(`whsec_…abcd`) ever after. `/api/alerts/notifications/`: the alert groups, newest first, each
with its deliveries and their states.
"""

from __future__ import annotations

from typing import Any

from django.core.exceptions import ValidationError as DjangoValidationError
from drf_spectacular.utils import extend_schema, extend_schema_view
from rest_framework import generics, serializers, status
from rest_framework.response import Response

from sagaplatform.api import ApiError, StrictCharField, error_responses

from . import alerting
from .alerting import SEVERITIES
from .alerting_models import new_signing_secret
from .models import AlertChannel, AlertDelivery, AlertGroup
from .permissions import IsOperator


class AlertChannelSerializer(serializers.ModelSerializer):
    name = serializers.SlugField(max_length=64, help_text="A unique name (letters, digits, - and _).")
    kind = serializers.ChoiceField(choices=AlertChannel.Kind.choices, help_text="`email` or `webhook`.")
    target = StrictCharField(max_length=500, help_text="E-mail addresses (comma-separated), or the http(s) URL.")
    secret = StrictCharField(
        max_length=200,
        required=False,
        allow_blank=True,
        write_only=True,
        help_text="Webhook signing key (`whsec_` + base64, 24 bytes or more); generated when left out.",
    )
    secret_hint = serializers.CharField(source="masked_secret", read_only=True, help_text="The secret, masked.")
    min_severity = serializers.ChoiceField(
        choices=SEVERITIES, default="warning", help_text="Alerts below this severity are not sent here."
    )
    enabled = serializers.BooleanField(default=True, help_text="A disabled channel is sent nothing.")

    class Meta:
        model = AlertChannel
        fields = ["id", "name", "kind", "target", "secret", "secret_hint", "min_severity", "enabled", "source"]
        read_only_fields = ["id", "source"]
        extra_kwargs = {
            "id": {"help_text": "The channel's id."},
            "source": {"help_text": "Where it was configured: `admin`, `api` or `env` (the environment)."},
        }

    def update(self, instance, validated_data):
        channel = super().update(instance, validated_data)
        if channel.kind == AlertChannel.Kind.WEBHOOK and not channel.secret:
            channel.secret = new_signing_secret()  # (an e-mail channel turned webhook)
            channel.save(update_fields=["secret"])
        return channel


class InvalidChannel(ApiError):
    """Well-formed, but not a channel that can be used: the target is not an address or an
    http(s) URL for its kind, the secret is not a usable key, or the name is reserved."""

    code = "invalid_channel"


class ChannelExists(ApiError):
    status = status.HTTP_409_CONFLICT
    code = "channel_exists"


def check_channel(data: dict, instance: AlertChannel | None = None) -> dict:
    """What the schema cannot say (it depends on the kind, or on what is stored), shared by
    create and change: raises InvalidChannel (400) or ChannelExists (409)."""
    problems: dict = {}
    name = data.get("name")
    if name is not None and name.startswith("env-"):
        problems["name"] = ["Names starting with env- are kept for the environment's channels."]
    kind = data.get("kind", getattr(instance, "kind", None))
    if "kind" in data or "target" in data:
        try:
            data["target"] = alerting.validate_target(kind, data.get("target", getattr(instance, "target", "")))
        except DjangoValidationError as error:
            problems["target"] = error.messages
    if data.get("secret"):
        if kind != AlertChannel.Kind.WEBHOOK:
            problems["secret"] = ["Only a webhook has a signing secret."]
        else:
            try:
                alerting.validate_secret(data["secret"])
            except DjangoValidationError as error:
                problems["secret"] = error.messages
    if problems:
        raise InvalidChannel("This channel cannot be used.", details=problems)
    clash = AlertChannel.objects.filter(name=name)
    if instance is not None:
        clash = clash.exclude(pk=instance.pk)
    if name is not None and clash.exists():
        raise ChannelExists(f"A channel named {name!r} exists.", details={"name": name})
    return data


class AlertDeliverySerializer(serializers.ModelSerializer):
    webhook_id = serializers.CharField(read_only=True, help_text="The delivery's id, the same on every retry.")
    channel = serializers.CharField(source="channel.name", help_text="The channel's name.")
    status = serializers.CharField(help_text="What it notifies: `firing` or `resolved`.")
    state = serializers.CharField(
        help_text="`pending` (being tried), `delivered` or `failed` (after the last attempt)."
    )

    class Meta:
        model = AlertDelivery
        fields = [
            "webhook_id",
            "channel",
            "status",
            "state",
            "attempts",
            "last_status_code",
            "last_error",
            "created_at",
            "next_attempt_at",
            "finished_at",
        ]
        extra_kwargs = {
            "attempts": {"help_text": "Attempts made so far."},
            "last_status_code": {"help_text": "The webhook's last HTTP status; null for e-mail or no answer."},
            "last_error": {"help_text": "Why the last attempt failed; empty once delivered."},
            "created_at": {"help_text": "When the notification was queued."},
            "next_attempt_at": {"help_text": "When the next attempt is due, while one is."},
            "finished_at": {"help_text": "When it was delivered, or recorded as failed."},
        }


class AlertGroupSerializer(serializers.ModelSerializer):
    deliveries = AlertDeliverySerializer(many=True, read_only=True, help_text="Each notification sent, newest first.")
    status = serializers.CharField(help_text="`firing`, or `resolved` once the condition cleared.")

    class Meta:
        model = AlertGroup
        fields = [
            "id",
            "rule",
            "severity",
            "status",
            "labels",
            "summary",
            "description",
            "runbook_url",
            "count",
            "started_at",
            "updated_at",
            "resolved_at",
            "deliveries",
        ]
        extra_kwargs = {
            "id": {"help_text": "The group's id."},
            "rule": {"help_text": "The rule that fired, e.g. `saga_parked`."},
            "severity": {"help_text": "`info`, `warning` or `critical`."},
            "labels": {"help_text": "The cause: e.g. `{definition, step}` for parked sagas."},
            "summary": {"help_text": "One line, with the count."},
            "description": {"help_text": "What it means and what to check."},
            "runbook_url": {"help_text": "The rule's section in docs/OPERATIONS.md."},
            "count": {"help_text": "How many things are affected (sagas, messages, ...), at the last evaluation."},
            "started_at": {"help_text": "When it fired."},
            "updated_at": {"help_text": "The last evaluation that saw it."},
            "resolved_at": {"help_text": "When the condition cleared."},
        }


REFUSALS: dict[int, list[tuple[Any, ...]]] = {
    400: [
        ("invalid_request", "The request is not valid."),
        ("invalid_channel", "This channel cannot be used.", [{"target": ["Enter an http:// or https:// URL."]}]),
    ],
    409: [("channel_exists", "A channel named 'oncall' exists.", [{"name": "oncall"}])],
}


@extend_schema_view(
    get=extend_schema(
        operation_id="alert_channels_list",
        tags=["alerts"],
        summary="List alert channels",
        responses={200: AlertChannelSerializer(many=True), **error_responses(400, 401, 403, 404)},
    ),
    post=extend_schema(
        operation_id="alert_channels_create",
        tags=["alerts"],
        summary="Add an alert channel",
        description="The answer shows a webhook's signing secret in full, this once.",
        responses={201: AlertChannelSerializer, **error_responses(400, 401, 403, 409, 413, 415, examples=REFUSALS)},
    ),
)
class AlertChannelListApi(generics.ListCreateAPIView):
    permission_classes = [IsOperator]
    serializer_class = AlertChannelSerializer
    queryset = AlertChannel.objects.all()

    def create(self, request, *args, **kwargs):
        serializer = self.get_serializer(data=request.data)
        serializer.is_valid(raise_exception=True)
        data = dict(serializer.validated_data)
        if data["kind"] == AlertChannel.Kind.WEBHOOK and not data.get("secret"):
            data["secret"] = new_signing_secret()
        channel = AlertChannel.objects.create(**check_channel(data), source="api")
        body = self.get_serializer(channel).data
        if channel.secret:
            body["secret"] = channel.secret  # shown once: masked from now on
        return Response(body, status=status.HTTP_201_CREATED)


@extend_schema_view(
    get=extend_schema(
        operation_id="alert_channels_retrieve",
        tags=["alerts"],
        summary="Read an alert channel",
        responses={200: AlertChannelSerializer, **error_responses(401, 403, 404)},
    ),
    patch=extend_schema(
        operation_id="alert_channels_update",
        tags=["alerts"],
        summary="Change an alert channel",
        responses={
            200: AlertChannelSerializer,
            **error_responses(400, 401, 403, 404, 409, 413, 415, examples=REFUSALS),
        },
    ),
    delete=extend_schema(
        operation_id="alert_channels_delete",
        tags=["alerts"],
        summary="Delete an alert channel",
        responses={204: None, **error_responses(401, 403, 404)},
    ),
)
class AlertChannelDetailApi(generics.RetrieveUpdateDestroyAPIView):
    permission_classes = [IsOperator]
    serializer_class = AlertChannelSerializer
    queryset = AlertChannel.objects.all()
    http_method_names = ["get", "patch", "delete", "head", "options"]

    def perform_update(self, serializer):
        check_channel(serializer.validated_data, serializer.instance)
        serializer.save()


@extend_schema_view(
    get=extend_schema(
        operation_id="alert_notifications_list",
        tags=["alerts"],
        summary="List alert notifications",
        description="Alert groups (a rule and its cause), newest first, with each delivery and its state.",
        responses={200: AlertGroupSerializer(many=True), **error_responses(400, 401, 403, 404)},
    )
)
class AlertGroupListApi(generics.ListAPIView):
    permission_classes = [IsOperator]
    serializer_class = AlertGroupSerializer

    def get_queryset(self):
        return AlertGroup.objects.prefetch_related("deliveries__channel").order_by("-updated_at")
