"""What every API endpoint shares: the error shape `{code, message, details}`."""

from __future__ import annotations

from django.core.exceptions import PermissionDenied, RequestDataTooBig
from django.http import Http404
from rest_framework import exceptions, serializers, status
from rest_framework.response import Response
from rest_framework.views import exception_handler as drf_exception_handler


class ApiError(Exception):
    """A refusal a client can act on. Subclasses set `status` and `code`."""

    status = status.HTTP_400_BAD_REQUEST
    code = "bad_request"

    def __init__(self, message: str, *, details: dict | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.details = details or {}


class ErrorSerializer(serializers.Serializer):
    """The body of every error response."""

    code = serializers.CharField()
    message = serializers.CharField()
    details = serializers.JSONField()


class SagaStepSerializer(serializers.Serializer):
    name = serializers.CharField()
    kind = serializers.CharField()
    service = serializers.CharField()
    state = serializers.CharField()
    attempts = serializers.IntegerField()
    compensation_attempts = serializers.IntegerField()
    confirm_attempts = serializers.IntegerField()
    next_attempt_at = serializers.DateTimeField(allow_null=True)
    started_at = serializers.DateTimeField(allow_null=True)
    finished_at = serializers.DateTimeField(allow_null=True)
    error = serializers.JSONField(allow_null=True)


def error_response(*, status_code: int, code: str, message: str, details=None, headers=None) -> Response:
    return Response({"code": code, "message": message, "details": details or {}}, status=status_code, headers=headers)


_CODES = {
    exceptions.ParseError: "malformed_request",
    exceptions.NotAuthenticated: "not_authenticated",
    exceptions.AuthenticationFailed: "authentication_failed",
    exceptions.PermissionDenied: "permission_denied",
    exceptions.NotFound: "not_found",
    exceptions.MethodNotAllowed: "method_not_allowed",
    exceptions.NotAcceptable: "not_acceptable",
    exceptions.UnsupportedMediaType: "unsupported_media_type",
    exceptions.Throttled: "throttled",
}


def exception_handler(exc, context):
    if isinstance(exc, ApiError):
        return error_response(status_code=exc.status, code=exc.code, message=exc.message, details=exc.details)
    if isinstance(exc, RequestDataTooBig):
        return error_response(
            status_code=status.HTTP_413_REQUEST_ENTITY_TOO_LARGE,
            code="request_too_large",
            message="The request body is too large.",
        )
    if isinstance(exc, Http404):
        exc = exceptions.NotFound()
    elif isinstance(exc, PermissionDenied):
        exc = exceptions.PermissionDenied()
    response = drf_exception_handler(exc, context)
    if response is None:
        return None
    if isinstance(exc, exceptions.ValidationError):
        code, message, details = "invalid_request", "The request is not valid.", exc.detail
    else:
        detail = exc.detail if isinstance(exc, exceptions.APIException) else str(exc)
        code = _CODES.get(type(exc), getattr(exc, "default_code", "error"))
        message, details = str(detail), {}
    response.data = {"code": code, "message": message, "details": details}
    return response
