"""Order endpoints: one thin view per operation, input and output serializers beside it.

A customer sees only their own orders: someone else's order is a 404, never a 403, so order ids
cannot be probed.
"""

from __future__ import annotations

from django.core.validators import RegexValidator
from django_countries import countries
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

from sagaplatform.api import (
    ANY_TEXT,
    LIST_ERROR_EXAMPLES,
    RETRY_AFTER_BUSY,
    ApiError,
    SagaStepSerializer,
    ScopedThrottle,
    StrictCharField,
    StrictChoiceField,
    StrictIntegerField,
    StrictRegexField,
    error_responses,
)
from sagaplatform.kernel import ports

from . import selectors, services
from .filters import OrderFilter
from .models import Order

MAX_LINES = 50
# Every assigned ISO 3166-1 alpha-2 code ("GE" is Georgia, not Germany: a name is refused).
COUNTRY_CODES = sorted(countries.countries)
COUNTRY_INVALID = (
    '"{input}" is not an ISO 3166-1 country code: use its two capital letters, for example DE for Germany.'
)
MAX_QUANTITY = 1000

ORDER_ID = "3f2c9a4e-8d1b-4c6a-9f0e-2b7d5a1c8e64"
SAGA_ID = "b71e0d52-6a3f-4e89-a2c4-9d8f1e3b5a07"
ADDRESS_EXAMPLE = {
    "name": "Alice Martin",
    "line1": "1 rue de Rivoli",
    "city": "Paris",
    "postal_code": "75001",
    "country": "FR",
}


class SagaRefSerializer(serializers.Serializer):
    id = serializers.UUIDField(help_text="The saga running the order's transaction.")
    state = serializers.CharField(help_text="The saga's state when the answer was made.")


class OrderListSerializer(serializers.Serializer):
    id = serializers.UUIDField(help_text="The order's id.")
    status = serializers.ChoiceField(choices=Order.Status.choices)
    mode = serializers.ChoiceField(choices=Order.Mode.choices)
    total = serializers.DecimalField(max_digits=12, decimal_places=2, help_text="What the customer pays.")
    currency = serializers.CharField(help_text="ISO 4217, e.g. EUR.")
    created_at = serializers.DateTimeField(help_text="When the order was accepted.")
    url = serializers.SerializerMethodField(help_text="The order's detail.")

    def get_url(self, order) -> str:
        return f"/api/orders/{order.id}/"


class OrderCreateThrottle(ScopedThrottle):
    """Placing orders: `API_THROTTLE_ORDERS_CREATE` per user (60 a minute by default)."""

    scope = "orders_create"


ORDER_NOT_FOUND = [("not_found", "No such order.")]

ORDER_ID_PARAMETER = OpenApiParameter(
    "order_id",
    OpenApiTypes.UUID,
    OpenApiParameter.PATH,
    description="The order's id, from the `202` of `POST /api/orders/`.",
    examples=[OpenApiExample("an order", value=ORDER_ID)],
)

IDEMPOTENCY_KEY = OpenApiParameter(
    "Idempotency-Key",
    {"type": "string", "minLength": 1, "maxLength": 255, "pattern": ANY_TEXT},
    OpenApiParameter.HEADER,
    description=(
        "1 to 255 characters, chosen by the client, per user; an empty or longer key is a 400. The "
        "same key and body return the original answer and place nothing; another body is a 422; a "
        "request while the first one is still being processed is a 409. Remembered for 24 hours "
        "(`IDEMPOTENCY_KEY_TTL`)."
    ),
    examples=[OpenApiExample("key", value="order-2026-11-22-0001")],
)


def place_validated(*, user, data: dict, idempotency_key: str | None) -> services.Placement:
    """Place what `OrdersApi.InputSerializer` validated (the API and the order form both do)."""
    return services.order_place(
        customer_id=user.id,
        customer_email=user.email,
        items=[dict(item) for item in data["items"]],
        payment_token=data["payment"]["token"],
        shipping_address=dict(data["shipping_address"]),
        mode=data["mode"],
        idempotency_key=idempotency_key,
        request_body=data,
    )


@extend_schema_view(
    get=extend_schema(
        operation_id="orders_list",
        tags=["orders"],
        summary="List your orders",
        description="Your orders, newest first, paginated. Staff see their own orders here too (sagas are under /api/sagas/).",
        responses={200: OrderListSerializer(many=True), **error_responses(400, 401, 404, examples=LIST_ERROR_EXAMPLES)},
    )
)
class OrdersApi(generics.ListAPIView):
    """`GET` lists the caller's orders; `POST` places one."""

    serializer_class = OrderListSerializer
    filterset_class = OrderFilter

    def get_queryset(self):
        return selectors.order_list_for_customer(customer_id=self.request.user.id)

    def get_throttles(self):
        return [OrderCreateThrottle()] if self.request.method == "POST" else []

    @extend_schema_serializer(
        component_name="OrderCreate",
        examples=[
            OpenApiExample(
                "two mugs",
                value={
                    "items": [{"sku": "SKU-MUG", "quantity": 2}],
                    "payment": {"token": "tok_visa"},
                    "shipping_address": ADDRESS_EXAMPLE,
                    "mode": "orchestrated",
                },
                request_only=True,
            )
        ],
    )
    class InputSerializer(serializers.Serializer):
        class ItemSerializer(serializers.Serializer):
            sku = StrictCharField(max_length=64, trim_whitespace=False, help_text="A catalogue SKU.")
            quantity = StrictIntegerField(min_value=1, max_value=MAX_QUANTITY, help_text="A JSON integer.")

        class PaymentSerializer(serializers.Serializer):
            token = StrictCharField(
                max_length=64,
                validators=[RegexValidator(r"^tok_[A-Za-z0-9_]+\Z", "Not a payment token.")],
                help_text="A test card token: `tok_visa` succeeds, `tok_declined` is declined, "
                "`tok_flaky_N` fails transiently N times, `tok_hang` hangs past the step timeout.",
            )

        class AddressSerializer(serializers.Serializer):
            name = StrictCharField(max_length=200, help_text="Who receives the parcel.")
            line1 = StrictCharField(max_length=200, help_text="Street and number.")
            line2 = StrictCharField(
                max_length=200, required=False, allow_blank=True, help_text="Building, floor, ... (optional)."
            )
            city = StrictCharField(max_length=100, help_text="Town or city.")
            postal_code = StrictCharField(max_length=20, help_text="As the country writes it.")
            country = serializers.ChoiceField(
                choices=COUNTRY_CODES,
                error_messages={"invalid_choice": COUNTRY_INVALID},
                help_text="ISO 3166-1 alpha-2 code, in capitals, e.g. FR.",
            )
            phone = StrictRegexField(r"^\+[0-9]{6,15}\Z", required=False, help_text="E.164, for SMS updates.")

        items = ItemSerializer(many=True, min_length=1, max_length=MAX_LINES, help_text="Each SKU at most once.")
        payment = PaymentSerializer()
        shipping_address = AddressSerializer()
        mode = StrictChoiceField(
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

    @extend_schema_serializer(
        component_name="OrderAccepted",
        examples=[
            OpenApiExample(
                "accepted",
                value={
                    "id": ORDER_ID,
                    "status": "pending",
                    "saga": {"id": SAGA_ID, "state": "pending"},
                    "url": f"/api/orders/{ORDER_ID}/",
                },
                response_only=True,
                status_codes=["202"],
            )
        ],
    )
    class OutputSerializer(serializers.Serializer):
        id = serializers.UUIDField(help_text="The order's id.")
        status = serializers.ChoiceField(choices=Order.Status.choices)
        saga = SagaRefSerializer()
        url = serializers.CharField(help_text="Where to follow the order.")

    @extend_schema(
        operation_id="orders_create",
        tags=["orders"],
        summary="Place an order",
        description=(
            "Accepts the order at once (`202`) and runs its transaction in the background; follow it "
            "at `url`. Unknown or inactive SKUs are a `400 unknown_sku`; a total over 9,999,999,999.99 "
            "a `400 order_total_too_large`. Limited to 60 a minute per user (`429`). While too many orders "
            "are in progress, `503 overloaded` with `Retry-After`."
        ),
        request=InputSerializer,
        parameters=[
            IDEMPOTENCY_KEY,
            OpenApiParameter(
                "Idempotent-Replayed",
                OpenApiTypes.STR,
                OpenApiParameter.HEADER,
                response=[202],
                enum=["true"],
                description="Present (`true`) when the answer replays an earlier request with the same key.",
            ),
            OpenApiParameter(
                "Location",
                OpenApiTypes.STR,
                OpenApiParameter.HEADER,
                response=[202],
                required=True,
                description="The order's URL.",
            ),
            RETRY_AFTER_BUSY,
        ],
        responses={
            202: OutputSerializer,
            **error_responses(
                400,
                401,
                403,
                409,
                413,
                415,
                422,
                429,
                503,
                examples={
                    400: [
                        ("invalid_request", "The request is not valid."),
                        ("unknown_sku", "Unknown SKU: SKU-NOPE"),
                        ("order_total_too_large", "The order total 10000000000.00 exceeds 9999999999.99"),
                        ("bad_request", "Idempotency-Key must be 1 to 255 characters, with no NUL."),
                    ],
                    409: [
                        (
                            "idempotency_key_in_flight",
                            "A request with this Idempotency-Key is still being processed; retry in a moment",
                        )
                    ],
                    422: [("idempotency_key_reused", "This Idempotency-Key was used with a different request body")],
                    503: [
                        ("overloaded", "Too many orders are in progress; retry in a moment"),
                        ("service_unavailable", "A database is unavailable or busy; retry later."),
                    ],
                },
            ),
        },
    )
    def post(self, request):
        idempotency_key = request.headers.get("Idempotency-Key")
        if idempotency_key is not None and (not (1 <= len(idempotency_key) <= 255) or "\x00" in idempotency_key):
            raise ApiError(
                "Idempotency-Key must be 1 to 255 characters, with no NUL.", details={"header": "Idempotency-Key"}
            )
        serializer = self.InputSerializer(data=request.data)
        serializer.is_valid(raise_exception=True)
        data = serializer.validated_data
        placement = place_validated(user=request.user, data=data, idempotency_key=idempotency_key)
        headers = {"Location": placement.receipt["url"]}
        if placement.replayed:
            headers["Idempotent-Replayed"] = "true"
        return Response(placement.receipt, status=status.HTTP_202_ACCEPTED, headers=headers)


class OrderLineSerializer(serializers.Serializer):
    sku = serializers.CharField(help_text="The catalogue SKU.")
    quantity = serializers.IntegerField(help_text="Units ordered.")
    unit_price = serializers.DecimalField(max_digits=10, decimal_places=2, help_text="The price when ordered.")


class OrderDetailApi(APIView):
    @extend_schema_serializer(
        component_name="OrderDetail",
        examples=[
            OpenApiExample(
                "shipped",
                value={
                    "id": ORDER_ID,
                    "status": "shipped",
                    "mode": "orchestrated",
                    "total": "25.00",
                    "currency": "EUR",
                    "lines": [{"sku": "SKU-MUG", "quantity": 2, "unit_price": "12.50"}],
                    "shipping_address": ADDRESS_EXAMPLE,
                    "failure": None,
                    "saga": {
                        "id": SAGA_ID,
                        "state": "completed",
                        "steps": [
                            {
                                "name": "reserve_stock",
                                "kind": "action",
                                "service": "inventory",
                                "state": "succeeded",
                                "attempts": 1,
                                "compensation_attempts": 0,
                                "confirm_attempts": 0,
                                "next_attempt_at": None,
                                "started_at": "2026-11-22T10:00:00.120Z",
                                "finished_at": "2026-11-22T10:00:00.180Z",
                                "error": None,
                            }
                        ],
                    },
                    "created_at": "2026-11-22T10:00:00.100Z",
                    "updated_at": "2026-11-22T10:00:10.900Z",
                },
                response_only=True,
            ),
            OpenApiExample(
                "declined",
                summary="rejected: the card was declined",
                value={
                    "id": ORDER_ID,
                    "status": "rejected",
                    "mode": "orchestrated",
                    "total": "25.00",
                    "currency": "EUR",
                    "lines": [{"sku": "SKU-MUG", "quantity": 2, "unit_price": "12.50"}],
                    "shipping_address": ADDRESS_EXAMPLE,
                    "failure": {"code": "card_declined", "message": "The card was declined"},
                    "saga": {"id": SAGA_ID, "state": "compensated", "steps": []},
                    "created_at": "2026-11-22T10:00:00.100Z",
                    "updated_at": "2026-11-22T10:00:00.600Z",
                },
                response_only=True,
            ),
        ],
    )
    class OutputSerializer(serializers.Serializer):
        class FailureSerializer(serializers.Serializer):
            code = serializers.CharField(help_text="e.g. card_declined, insufficient_stock, cancelled.")
            message = serializers.CharField(help_text="Human-readable, as told to the customer.")

        @extend_schema_serializer(component_name="OrderSaga")
        class SagaSerializer(serializers.Serializer):
            id = serializers.UUIDField(help_text="The saga running the order's transaction.")
            state = serializers.CharField(help_text="pending, running, compensating, completed, compensated, ...")
            steps = SagaStepSerializer(many=True, help_text="The saga's steps, in definition order.")

        id = serializers.UUIDField(help_text="The order's id.")
        status = serializers.ChoiceField(choices=Order.Status.choices)
        mode = serializers.ChoiceField(choices=Order.Mode.choices)
        total = serializers.DecimalField(max_digits=12, decimal_places=2, help_text="What the customer pays.")
        currency = serializers.CharField(help_text="ISO 4217, e.g. EUR.")
        lines = OrderLineSerializer(many=True, help_text="What was ordered, by SKU.")
        shipping_address = serializers.JSONField(help_text="As given when the order was placed.")
        failure = FailureSerializer(
            allow_null=True, help_text="Why the order was rejected or cancelled; null otherwise."
        )
        saga = SagaSerializer()
        created_at = serializers.DateTimeField(help_text="When the order was accepted.")
        updated_at = serializers.DateTimeField(help_text="When its status last changed.")

    @extend_schema(
        operation_id="orders_retrieve",
        tags=["orders"],
        summary="Read one of your orders",
        description="The order, why it failed if it did, and its saga's steps.",
        parameters=[ORDER_ID_PARAMETER],
        responses={200: OutputSerializer, **error_responses(401, 404, examples={404: ORDER_NOT_FOUND})},
    )
    def get(self, request, order_id):
        order = selectors.order_get_for_customer(order_id=order_id, customer_id=request.user.id)
        if order is None:
            raise NotFound("No such order.")
        # Before its saga has started, the order shows the steps it will run, all pending: a
        # client that looks a step up by name finds it from the first read.
        saga = ports.saga_summary(order.saga_id) or {
            "id": order.saga_id,
            "state": "pending",
            "steps": ports.saga_plan(mode=order.mode),
        }
        data = {
            "id": order.id,
            "status": order.status,
            "mode": order.mode,
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


CANCEL_REFUSALS = [
    ("already_shipped", "The order has shipped; it can no longer be cancelled"),
    ("shipment_in_progress", "The parcel is leaving the warehouse right now; it can no longer be cancelled"),
    ("already_cancelled", "This order is already cancelled"),
    ("not_cancellable", "This order can no longer be cancelled (it is completed)"),
]


class OrderCancelApi(APIView):
    @extend_schema_serializer(
        component_name="OrderCancel",
        examples=[OpenApiExample("mistake", value={"reason": "ordered by mistake"}, request_only=True)],
    )
    class InputSerializer(serializers.Serializer):
        reason = StrictCharField(
            max_length=500, required=False, allow_blank=True, default="", help_text="Told to the customer."
        )

    @extend_schema_serializer(
        component_name="OrderCancelled",
        examples=[
            OpenApiExample(
                "compensating",
                value={"id": ORDER_ID, "status": "approved", "saga": {"id": SAGA_ID, "state": "compensating"}},
                response_only=True,
                status_codes=["202"],
            )
        ],
    )
    class OutputSerializer(serializers.Serializer):
        id = serializers.UUIDField(help_text="The order's id.")
        status = serializers.ChoiceField(choices=Order.Status.choices, help_text="The order's status at that moment.")
        saga = SagaRefSerializer()

    @extend_schema(
        operation_id="orders_cancel",
        tags=["orders"],
        summary="Cancel one of your orders",
        parameters=[ORDER_ID_PARAMETER],
        request=InputSerializer,
        responses={
            202: OutputSerializer,
            **error_responses(
                400,
                401,
                403,
                404,
                409,
                413,
                415,
                examples={
                    400: [("invalid_request", "The request is not valid.", {"reason": ["Not a valid string."]})],
                    404: ORDER_NOT_FOUND,
                    409: CANCEL_REFUSALS,
                },
            ),
        },
        description=(
            "Cancel the order: nothing more is started, steps in flight finish, and what succeeded is "
            "undone (stock released, payment refunded, booking cancelled); the order then ends "
            "`cancelled`. The body is optional. Refused with 409 once the parcel has left the "
            "warehouse (`already_shipped`), while it is leaving (`shipment_in_progress`), or when the "
            "order already ended (`already_cancelled`, `not_cancellable`)."
        ),
    )
    def post(self, request, order_id):
        order = selectors.order_get_for_customer(order_id=order_id, customer_id=request.user.id)
        if order is None:
            raise NotFound("No such order.")
        serializer = self.InputSerializer(data=request.data)
        serializer.is_valid(raise_exception=True)
        saga = services.order_cancel(
            order=order, actor=f"customer:{request.user.get_username()}", reason=serializer.validated_data["reason"]
        )
        data = {"id": order.id, "status": order.status, "saga": {"id": saga.id, "state": saga.state}}
        return Response(self.OutputSerializer(data).data, status=status.HTTP_202_ACCEPTED)
