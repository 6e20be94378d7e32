"""Order endpoints: one thin view per operation, input and output serializers beside it."""

from __future__ import annotations

from django.core.validators import RegexValidator
from drf_spectacular.utils import OpenApiParameter, extend_schema, extend_schema_serializer
from rest_framework import serializers, status
from rest_framework.exceptions import NotFound
from rest_framework.response import Response
from rest_framework.views import APIView

from sagaplatform.api import ApiError, ErrorSerializer, SagaStepSerializer
from sagaplatform.kernel import ports

from . import selectors, services
from .models import Order

MAX_LINES = 50
MAX_QUANTITY = 1000


class StrictIntegerField(serializers.IntegerField):
    """An integer that is a JSON integer: no "3", no 3.0, no true."""

    def to_internal_value(self, data):
        if type(data) is not int:
            self.fail("invalid")
        return super().to_internal_value(data)


class SagaRefSerializer(serializers.Serializer):
    id = serializers.UUIDField()
    state = serializers.CharField()


class OrderListSerializer(serializers.Serializer):
    id = serializers.UUIDField()
    status = serializers.CharField()
    total = serializers.DecimalField(max_digits=12, decimal_places=2)
    currency = serializers.CharField()
    created_at = serializers.DateTimeField()


class OrdersApi(APIView):
    """`GET` lists the caller's orders; `POST` places one."""

    @extend_schema_serializer(component_name="OrderCreateRequest")
    class InputSerializer(serializers.Serializer):
        class ItemSerializer(serializers.Serializer):
            sku = serializers.CharField(max_length=64, trim_whitespace=False)
            quantity = StrictIntegerField(min_value=1, max_value=MAX_QUANTITY)

        class PaymentSerializer(serializers.Serializer):
            token = serializers.CharField(
                max_length=64, validators=[RegexValidator(r"^tok_[A-Za-z0-9_]+$", "Not a payment token.")]
            )

        class AddressSerializer(serializers.Serializer):
            name = serializers.CharField(max_length=200)
            line1 = serializers.CharField(max_length=200)
            line2 = serializers.CharField(max_length=200, required=False, allow_blank=True)
            city = serializers.CharField(max_length=100)
            postal_code = serializers.CharField(max_length=20)
            country = serializers.RegexField(r"^[A-Z]{2}$", help_text="ISO 3166-1 alpha-2 code, e.g. FR.")
            phone = serializers.RegexField(r"^\+[0-9]{6,15}$", required=False, help_text="E.164, for SMS updates.")

        items = ItemSerializer(many=True, min_length=1, max_length=MAX_LINES)
        payment = PaymentSerializer()
        shipping_address = AddressSerializer()
        mode = serializers.ChoiceField(
            choices=Order.Mode.choices,
            default=Order.Mode.ORCHESTRATED,
            help_text="How the distributed transaction runs: "
            + "; ".join(f"`{v}`: {label}" for v, label in Order.Mode.choices),
        )

        def validate_items(self, items):
            skus = [item["sku"] for item in items]
            duplicates = sorted({sku for sku in skus if skus.count(sku) > 1})
            if duplicates:
                raise serializers.ValidationError(f"Each SKU may appear once; repeated: {', '.join(duplicates)}.")
            return items

    @extend_schema_serializer(component_name="OrderAccepted")
    class OutputSerializer(serializers.Serializer):
        id = serializers.UUIDField()
        status = serializers.CharField()
        saga = SagaRefSerializer()
        url = serializers.CharField()

    @extend_schema(operation_id="orders_list", responses={200: OrderListSerializer(many=True), 401: ErrorSerializer})
    def get(self, request):
        orders = selectors.order_list_for_customer(customer_id=request.user.id)[:100]
        return Response(OrderListSerializer(orders, many=True).data)

    @extend_schema(
        operation_id="orders_create",
        request=InputSerializer,
        parameters=[
            OpenApiParameter(
                "Idempotency-Key",
                str,
                OpenApiParameter.HEADER,
                description="Repeat a request safely: the same key and body return the same order.",
            )
        ],
        responses={
            202: OutputSerializer,
            400: ErrorSerializer,
            401: ErrorSerializer,
            409: ErrorSerializer,
            422: ErrorSerializer,
        },
    )
    def post(self, request):
        idempotency_key = request.headers.get("Idempotency-Key") or None
        if idempotency_key is not None and not (1 <= len(idempotency_key) <= 255):
            raise ApiError("Idempotency-Key must be 1 to 255 characters.", details={"header": "Idempotency-Key"})
        serializer = self.InputSerializer(data=request.data)
        serializer.is_valid(raise_exception=True)
        data = serializer.validated_data
        placement = services.order_place(
            customer_id=request.user.id,
            customer_email=request.user.email,
            items=[dict(item) for item in data["items"]],
            payment_token=data["payment"]["token"],
            shipping_address=dict(data["shipping_address"]),
            mode=data["mode"],
            idempotency_key=idempotency_key,
            request_body=serializer.validated_data,
        )
        headers = {"Location": placement.receipt["url"]}
        if placement.replayed:
            headers["Idempotent-Replayed"] = "true"
        return Response(placement.receipt, status=status.HTTP_202_ACCEPTED, headers=headers)


class OrderLineSerializer(serializers.Serializer):
    sku = serializers.CharField()
    quantity = serializers.IntegerField()
    unit_price = serializers.DecimalField(max_digits=10, decimal_places=2)


class OrderDetailApi(APIView):
    @extend_schema_serializer(component_name="OrderDetail")
    class OutputSerializer(serializers.Serializer):
        class FailureSerializer(serializers.Serializer):
            code = serializers.CharField()
            message = serializers.CharField()

        class SagaSerializer(serializers.Serializer):
            id = serializers.UUIDField()
            state = serializers.CharField()
            steps = SagaStepSerializer(many=True)

        id = serializers.UUIDField()
        status = serializers.CharField()
        total = serializers.DecimalField(max_digits=12, decimal_places=2)
        currency = serializers.CharField()
        lines = OrderLineSerializer(many=True)
        shipping_address = serializers.JSONField()
        failure = FailureSerializer(allow_null=True)
        saga = SagaSerializer()
        created_at = serializers.DateTimeField()
        updated_at = serializers.DateTimeField()

    @extend_schema(
        operation_id="orders_retrieve", responses={200: OutputSerializer, 401: ErrorSerializer, 404: ErrorSerializer}
    )
    def get(self, request, order_id):
        order = selectors.order_get_for_customer(order_id=order_id, customer_id=request.user.id)
        if order is None:
            raise NotFound("No such order.")
        saga = ports.saga_summary(order.saga_id) or {"id": order.saga_id, "state": "pending", "steps": []}
        data = {
            "id": order.id,
            "status": order.status,
            "total": order.total,
            "currency": order.currency,
            "lines": list(order.lines.all()),
            "shipping_address": order.shipping_address,
            "failure": {"code": order.failure_code, "message": order.failure_message} if order.failure_code else None,
            "saga": saga,
            "created_at": order.created_at,
            "updated_at": order.updated_at,
        }
        return Response(self.OutputSerializer(data).data)


class OrderCancelApi(APIView):
    class InputSerializer(serializers.Serializer):
        reason = serializers.CharField(max_length=500, required=False, allow_blank=True, default="")

    @extend_schema_serializer(component_name="OrderCancelled")
    class OutputSerializer(serializers.Serializer):
        id = serializers.UUIDField()
        status = serializers.CharField()
        saga = SagaRefSerializer()

    @extend_schema(
        operation_id="orders_cancel",
        request=InputSerializer,
        responses={202: OutputSerializer, 401: ErrorSerializer, 404: ErrorSerializer, 409: ErrorSerializer},
        description=(
            "Cancel the order: nothing more is started, steps in flight finish, and what succeeded is "
            "undone (stock released, payment refunded, booking cancelled). Refused with 409 once the "
            "parcel has left the warehouse (`already_shipped`), while it is leaving "
            "(`shipment_in_progress`), or when the order already ended (`already_cancelled`, `not_cancellable`)."
        ),
    )
    def post(self, request, order_id):
        order = selectors.order_get_for_customer(order_id=order_id, customer_id=request.user.id)
        if order is None:
            raise NotFound("No such order.")
        serializer = self.InputSerializer(data=request.data)
        serializer.is_valid(raise_exception=True)
        saga = ports.saga_cancel(
            saga_id=order.saga_id,
            context={
                "order_id": str(order.id),
                "customer_email": order.customer_email,
                "shipping_address": order.shipping_address,
                "mode": order.mode,
            },
            actor=f"customer:{request.user.get_username()}",
            reason=serializer.validated_data["reason"],
        )
        data = {"id": order.id, "status": order.status, "saga": {"id": saga.id, "state": saga.state}}
        return Response(self.OutputSerializer(data).data, status=status.HTTP_202_ACCEPTED)
