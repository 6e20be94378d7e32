"""The API token endpoint: `POST /api/auth/token/` issues a user's token, `DELETE` revokes it."""

from __future__ import annotations

from django.contrib.auth import authenticate
from drf_spectacular.utils import OpenApiExample, extend_schema, extend_schema_serializer
from rest_framework import serializers, status
from rest_framework.authtoken.models import Token
from rest_framework.permissions import AllowAny, IsAuthenticated
from rest_framework.response import Response
from rest_framework.views import APIView

from .api import RETRY_AFTER, ApiError, ScopedThrottle, StrictCharField, error_responses


class InvalidCredentials(ApiError):
    code = "invalid_credentials"


class TokenObtainThrottle(ScopedThrottle):
    """Guessing passwords through the token endpoint is slowed per client address."""

    scope = "auth_token"


class TokenApi(APIView):
    """`POST` exchanges a username and password for the user's API token; `DELETE` revokes it."""

    @extend_schema_serializer(component_name="TokenCredentials")
    class InputSerializer(serializers.Serializer):
        username = StrictCharField(max_length=150, help_text="The user's login.")
        password = StrictCharField(
            max_length=128, trim_whitespace=False, style={"input_type": "password"}, help_text="The user's password."
        )

    @extend_schema_serializer(component_name="Token")
    class OutputSerializer(serializers.Serializer):
        token = serializers.CharField(help_text="Send it as `Authorization: Token <token>`.")

    def get_permissions(self):
        if self.request.method == "POST":
            return [AllowAny()]
        return [IsAuthenticated()]

    def get_throttles(self):
        return [TokenObtainThrottle()] if self.request.method == "POST" else []

    @extend_schema(
        operation_id="auth_token_create",
        tags=["auth"],
        summary="Get an API token",
        description=(
            "Exchange a username and password for the user's API token (the same token until it is "
            "revoked). Wrong credentials, or an inactive user, are a `400 invalid_credentials`. "
            "Limited to 10 requests a minute per client address."
        ),
        request=InputSerializer,
        responses={
            200: OutputSerializer,
            **error_responses(
                400,
                403,
                413,
                415,
                429,
                examples={
                    400: [
                        ("invalid_credentials", "Unable to log in with the username and password given."),
                        ("invalid_request", "The request is not valid."),
                    ],
                    403: [("csrf_failed", "CSRF Failed: CSRF token missing.")],
                },
            ),
        },
        parameters=[RETRY_AFTER],
        examples=[
            OpenApiExample(
                "credentials", value={"username": "alice", "password": "alice-demo-password"}, request_only=True
            ),
            OpenApiExample(
                "token",
                value={"token": "9944b09199c62bcf9418ad846dd0e4bbdfc6ee4b"},
                response_only=True,
                status_codes=["200"],
            ),
        ],
        auth=[],
    )
    def post(self, request):
        serializer = self.InputSerializer(data=request.data)
        serializer.is_valid(raise_exception=True)
        user = authenticate(
            request._request,
            username=serializer.validated_data["username"],
            password=serializer.validated_data["password"],
        )
        if user is None:  # unknown user, wrong password, or inactive: the same answer for each
            raise InvalidCredentials("Unable to log in with the username and password given.")
        token, _ = Token.objects.get_or_create(user=user)
        return Response(self.OutputSerializer({"token": token.key}).data)

    @extend_schema(
        operation_id="auth_token_destroy",
        tags=["auth"],
        summary="Revoke your API token",
        description="The token stops working at once; `POST` issues a new one.",
        request=None,
        responses={204: None, **error_responses(401, 403)},
    )
    def delete(self, request):
        Token.objects.filter(user=request.user).delete()
        return Response(status=status.HTTP_204_NO_CONTENT)
