"""What every API endpoint shares: the error shape `{code, message, details}`, pagination,
throttling, and the pieces of the OpenAPI documentation that repeat from one endpoint to the next.

The authentication and parser classes named in settings import this module, and DRF loads them
when `rest_framework.views` (or `generics`) is first imported: so this module imports neither.
"""

from __future__ import annotations

import logging
import math
from typing import Any

from django.conf import settings
from django.core.cache import cache as default_cache
from django.core.exceptions import PermissionDenied, RequestDataTooBig
from django.core.validators import RegexValidator
from django.db import InterfaceError, OperationalError
from django.http import Http404
from drf_spectacular.types import OpenApiTypes
from drf_spectacular.utils import OpenApiExample, OpenApiParameter, OpenApiResponse
from rest_framework import exceptions, pagination, serializers, status
from rest_framework.response import Response
from rest_framework.settings import api_settings
from rest_framework.throttling import SimpleRateThrottle

logger = logging.getLogger(__name__)


class ApiError(Exception):
    """A refusal a client can act on. Subclasses set `status` and `code`."""

    status: int = status.HTTP_400_BAD_REQUEST
    code = "bad_request"

    def __init__(self, message: str, *, details: dict | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.details = details or {}


class ServiceUnavailable(ApiError):
    """The platform cannot take the request now, and a retry later can succeed: a database is
    down or its connections are all busy, or too many orders are in flight (admission). Answered
    503 with `Retry-After` (also `details.retry_after`); nothing was written."""

    status = status.HTTP_503_SERVICE_UNAVAILABLE
    code = "service_unavailable"

    def __init__(self, message: str, *, details: dict | None = None) -> None:
        super().__init__(message, details={"retry_after": settings.API_RETRY_AFTER, **(details or {})})


class RequestTooLarge(exceptions.APIException):
    status_code = status.HTTP_413_REQUEST_ENTITY_TOO_LARGE
    default_detail = "The request body is too large."
    default_code = "request_too_large"


def operator_actor(user) -> str:
    """How an operator's action is recorded in a saga's timeline, from the API, the admin and
    the dashboard alike (customers are `customer:<name>`)."""
    return f"user:{user.get_username()}"


class ErrorSerializer(serializers.Serializer):
    """The body of every error response."""

    code = serializers.CharField(help_text="Machine-readable: what went wrong, e.g. `invalid_request`, `not_found`.")
    message = serializers.CharField(help_text="Human-readable explanation.")
    details = serializers.DictField(
        help_text="Structured context; for `invalid_request`, the problems per field (nested like the body)."
    )


class SagaStepSerializer(serializers.Serializer):
    name = serializers.CharField(help_text="The step's name in its saga definition, e.g. `charge_payment`.")
    kind = serializers.ChoiceField(
        choices=["action", "on_failure"], help_text="`on_failure` steps run only once the saga has failed."
    )
    service = serializers.CharField(help_text="The service that carries the step out, e.g. `payments`.")
    state = serializers.CharField(help_text="pending, running, retrying, succeeded, failed, compensating, ...")
    attempts = serializers.IntegerField(help_text="Attempts at the action so far.")
    compensation_attempts = serializers.IntegerField(help_text="Attempts at undoing it so far.")
    confirm_attempts = serializers.IntegerField(help_text="TCC: attempts at the confirm.")
    next_attempt_at = serializers.DateTimeField(allow_null=True, help_text="When a step waiting out a backoff retries.")
    started_at = serializers.DateTimeField(allow_null=True, help_text="When its first attempt was sent.")
    finished_at = serializers.DateTimeField(allow_null=True, help_text="When it settled.")
    error = serializers.JSONField(allow_null=True, help_text="The last error, `{code, message}`, if any.")


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
    # Imported here: importing rest_framework.views loads the authentication and parser classes
    # named in settings, which import this module.
    from rest_framework.views import exception_handler as drf_exception_handler

    if isinstance(exc, (OperationalError, InterfaceError)):
        # A database down, restarting, out of connections, or the web process's pool empty for
        # DATABASE_POOL_TIMEOUT: the request's transaction rolled back, and a retry can succeed.
        logger.warning("database unavailable, answering 503: %s", exc)
        exc = ServiceUnavailable("A database is unavailable or busy; retry later.")
    if isinstance(exc, ApiError):
        headers = {"Retry-After": str(exc.details["retry_after"])} if isinstance(exc, ServiceUnavailable) else None
        return error_response(
            status_code=exc.status, code=exc.code, message=exc.message, details=exc.details, headers=headers
        )
    if isinstance(exc, RequestDataTooBig):  # Django's check of the declared Content-Length
        exc = RequestTooLarge(f"The request body is larger than {settings.DATA_UPLOAD_MAX_MEMORY_SIZE} bytes.")
    elif isinstance(exc, Http404):
        exc = exceptions.NotFound()
    elif isinstance(exc, PermissionDenied):
        exc = exceptions.PermissionDenied()
    response = drf_exception_handler(exc, context)
    if response is None:
        return None
    details: dict = {}
    if isinstance(exc, exceptions.ValidationError):
        code, message = "invalid_request", "The request is not valid."
        # A serializer's errors are a dict per field; `raise ValidationError("...")` gives a list.
        details = exc.detail if isinstance(exc.detail, dict) else {"non_field_errors": exc.detail}
    else:
        detail = exc.detail if isinstance(exc, exceptions.APIException) else str(exc)
        code = _CODES.get(type(exc), getattr(exc, "default_code", "error"))
        message = str(detail)
        wait = getattr(exc, "wait", None)  # Throttled sets it (the stubs do not declare it)
        if isinstance(exc, exceptions.Throttled) and wait is not None:
            details = {"retry_after": math.ceil(wait)}
            response["Retry-After"] = str(details["retry_after"])  # DRF rounds down: 0 would invite a retry now
    response.data = {"code": code, "message": message, "details": details}
    return response


# --- Pagination ---------------------------------------------------------------------------------


class Pagination(pagination.PageNumberPagination):
    """`?page=N&page_size=M` on every list: 50 per page by default (`API_PAGE_SIZE`), at most 200.

    What the schema documents is what is accepted: a `page` that is not a positive integer, or a
    `page_size` outside 1 to 200, is a 400 rather than DRF's silent fallback or clamp, so a client
    with a bug learns about it; any positive page past the last one, however large, is a 404.
    """

    page_size_query_param = "page_size"
    max_page_size = 200
    # Past the last page of any list; also keeps int() clear of Python's digit limit.
    _PAST_ANY_PAGE = 10**18

    def _positive(self, request, name: str, *, maximum: int | None = None) -> int | None:
        raw = request.query_params.get(name)
        if raw is None:
            return None
        if not raw.isascii() or not raw.isdigit() or not raw.strip("0"):
            raise exceptions.ValidationError({name: ["A positive integer is required."]})
        number = int(raw) if len(raw.lstrip("0")) < 19 else self._PAST_ANY_PAGE
        if maximum is not None and number > maximum:
            raise exceptions.ValidationError({name: [f"At most {maximum}."]})
        return number

    def get_page_number(self, request, paginator):
        return self._positive(request, self.page_query_param) or 1

    def get_page_size(self, request):
        return self._positive(request, self.page_size_query_param, maximum=self.max_page_size) or self.page_size

    def get_paginated_response_schema(self, schema):
        paginated = super().get_paginated_response_schema(schema)
        paginated["properties"]["next"]["example"] = "https://shop.example/api/orders/?page=3"
        paginated["properties"]["previous"]["example"] = "https://shop.example/api/orders/?page=1"
        paginated["properties"]["count"]["description"] = "Results over all pages."
        paginated["properties"]["next"]["description"] = "The next page; null on the last one."
        paginated["properties"]["previous"]["description"] = "The previous page; null on the first one."
        if isinstance(schema, dict):
            paginated["properties"]["results"] = {**schema, "description": "This page's results."}
        return paginated

    def get_schema_operation_parameters(self, view):
        parameters = super().get_schema_operation_parameters(view)
        for parameter in parameters:
            parameter["schema"]["minimum"] = 1
            if parameter["name"] == self.page_size_query_param:
                parameter["schema"]["maximum"] = self.max_page_size
                parameter["description"] = (
                    f"Results per page: {self.page_size} by default, at most {self.max_page_size}."
                )
            else:
                parameter["description"] = "The page, from 1. A page past the last one is a 404."
        return parameters


# --- Throttling ---------------------------------------------------------------------------------


class ScopedThrottle(SimpleRateThrottle):
    """A rate from `REST_FRAMEWORK["DEFAULT_THROTTLE_RATES"][scope]`, counted per user (per client
    address when anonymous) in the default cache: Redis in production, so every web process
    shares the count.

    The rate is read at each request rather than when DRF is imported, so a changed setting applies.
    """

    cache = default_cache

    def allow_request(self, request, view) -> bool:
        try:
            return super().allow_request(request, view)
        except Exception:
            # The cache (Redis) is down. Orders are still accepted then (the outbox delivers them
            # later), so the limit fails open rather than turning an outage into 500s.
            logger.warning("rate limit %s not applied: the cache is unavailable", self.scope, exc_info=True)
            return True

    def get_rate(self):
        return api_settings.DEFAULT_THROTTLE_RATES[self.scope or ""]

    def get_cache_key(self, request, view):
        ident = request.user.pk if request.user and request.user.is_authenticated else self.get_ident(request)
        return self.cache_format % {"scope": self.scope, "ident": ident}


# --- OpenAPI documentation ---------------------------------------------------------------------

_ERRORS = {
    400: ("The request is not valid: see `details`.", "invalid_request", "The request is not valid."),
    401: (
        "Not authenticated, or the credentials (token, session, password) are wrong.",
        "not_authenticated",
        "Authentication credentials were not provided.",
    ),
    403: (
        "Authenticated, but not allowed; or a session-authenticated change without its CSRF token (`csrf_failed`).",
        "permission_denied",
        "You do not have permission to perform this action.",
    ),
    404: ("No such resource (or not yours).", "not_found", "Not found."),
    409: ("Refused in the resource's current state.", "conflict", "Refused in the current state."),
    413: (
        "The request body is larger than the limit (`DATA_UPLOAD_MAX_MEMORY_SIZE`, 64 KB).",
        "request_too_large",
        "The request body is too large.",
    ),
    415: (
        "The body is not `application/json`.",
        "unsupported_media_type",
        'Unsupported media type "text/plain" in request.',
    ),
    422: ("The request cannot be processed as sent.", "unprocessable", "Unprocessable."),
    429: (
        "Too many requests: wait `Retry-After` seconds (also in `details.retry_after`).",
        "throttled",
        "Request was throttled. Expected available in 42 seconds.",
    ),
    503: (
        "Too many orders in progress, the server busy, or a database unavailable: retry after"
        " `Retry-After` seconds (also in `details.retry_after`).",
        "service_unavailable",
        "A database is unavailable or busy; retry later.",
    ),
}

EXAMPLE_DETAILS = {
    400: {"items": [{"quantity": ["Ensure this value is greater than or equal to 1."]}]},
    429: {"retry_after": 42},
    503: {"retry_after": 2},
}


# What a list answers besides its results: a bad page, page size or filter; a page past the last.
LIST_ERROR_EXAMPLES: dict[int, list[tuple[Any, ...]]] = {
    400: [("invalid_request", "The request is not valid.", {"page_size": ["At most 200."]})],
    404: [("not_found", "Invalid page.", {})],
}


def error_responses(*statuses: int, examples: dict[int, list[tuple[Any, ...]]] | None = None) -> dict:
    """OpenAPI responses for the error statuses an endpoint can answer, with examples.

    `examples` adds endpoint-specific codes: `{409: [("already_shipped", "The order has shipped")]}`,
    with the example's `details` as a third item when they are not the status's usual ones.
    """
    responses = {}
    for status_code in statuses:
        description, code, message = _ERRORS[status_code]
        specific = (examples or {}).get(status_code)
        pairs = specific or [(code, message)]
        responses[status_code] = OpenApiResponse(
            response=ErrorSerializer,
            description=description,
            examples=[
                OpenApiExample(
                    the_code,
                    value={
                        "code": the_code,
                        "message": the_message,
                        "details": the_details[0] if the_details else EXAMPLE_DETAILS.get(status_code, {}),
                    },
                    status_codes=[str(status_code)],
                    response_only=True,
                )
                for the_code, the_message, *the_details in pairs
            ],
        )
    return responses


RETRY_AFTER = OpenApiParameter(
    "Retry-After",
    OpenApiTypes.INT,
    OpenApiParameter.HEADER,
    response=[429],
    description="Seconds to wait before trying again.",
)
RETRY_AFTER_BUSY = OpenApiParameter(
    "Retry-After",
    OpenApiTypes.INT,
    OpenApiParameter.HEADER,
    response=[429, 503],
    description="Seconds to wait before trying again.",
)

API_DESCRIPTION = """
Place orders that run as distributed transactions (sagas) across the inventory, payments, orders,
shipping and notifications services, follow them, cancel them; operators inspect and steer sagas.

**Authentication.** Any of:
- an API token: `Authorization: Token <key>` (`Bearer <key>` works too). Get one with
  `POST /api/auth/token/` and your username and password; `DELETE /api/auth/token/` revokes it.
- the session cookie of a logged-in browser. Every state-changing request (POST, DELETE) made
  with the session must carry the CSRF token (`X-CSRFToken` header, from the `csrftoken` cookie),
  or it is refused with `403 csrf_failed`. Token and Basic authentication need no CSRF token.
- HTTP Basic with username and password (for scripts and curl). Prefer a token: each password
  check costs the server a slow hash.

After 10 wrong passwords for one username, or from one client address (`AUTH_FAILURE_LIMIT`),
every password check for it (HTTP Basic, the token endpoint, the login page) is refused with
`429 too_many_failed_logins` and `Retry-After`, for 15 minutes after the last failure
(`AUTH_LOCKOUT_MINUTES`). An API token keeps working meanwhile.

A request without valid credentials is answered `401` with a `WWW-Authenticate` challenge.
Customers see and cancel only their own orders (someone else's order is a 404). The saga
endpoints are for staff with the `orchestration.operate_saga` permission; the fault endpoints for
staff with the fault rule model permissions (`kernel.view_faultrule`, `add_`, `delete_`).

**Errors.** Every error is JSON `{"code", "message", "details"}` with a 4xx status: `code` is
machine-readable (`invalid_request`, `not_found`, `already_shipped`, ...), `details` says more
(for `invalid_request`, the problems per field).

**Lists** are paginated: `?page=` (from 1) and `?page_size=` (50 by default, at most 200). The
answer is `{"count", "next", "previous", "results"}`. A page past the last one, however large, is
a `404`; a `page_size` outside 1 to 200, or a filter given with no value, a `400`.

**Input** is taken as the schema describes it, or refused with `400 invalid_request`: a value of
another JSON type (`0` for a string, `"3"` for an integer, `"true"` for a boolean) is refused, not
converted; text is kept as sent (not trimmed), may not contain the NUL character, and where it is
required must hold more than spaces (each text field's `pattern` says so).

**Idempotency.** `POST /api/orders/` takes an optional `Idempotency-Key` header (1 to 255
characters, per user). The same key with the same body returns the original answer (header
`Idempotent-Replayed: true`) and places nothing; with another body it is a `422
idempotency_key_reused`; while the first request with the key is still being processed, `409
idempotency_key_in_flight` (retry a little later). Keys are remembered for 24 hours
(`IDEMPOTENCY_KEY_TTL`); after that the same key places a new order.

**Limits.** Request bodies are at most 64 KB (`413 request_too_large`). Placing orders is limited
to 60 a minute per user (`API_THROTTLE_ORDERS_CREATE`) and asking for a token to 10 a minute per
client address (`API_THROTTLE_AUTH_TOKEN`): beyond, `429 throttled` with `Retry-After`.

**Overload.** While too many orders are in flight, `POST /api/orders/` answers `503 overloaded`,
and any endpoint does while the server is busy; when a database is unavailable or busy, any
endpoint may answer `503 service_unavailable`. All carry `Retry-After`: retry then, with the
same `Idempotency-Key`, so a retry never places an order twice.
"""


def describe_api(result, generator, request, public):
    """drf-spectacular post-processing hook: the long description above."""
    result["info"]["description"] = API_DESCRIPTION.strip()
    return result


# --- Strict input fields ------------------------------------------------------------------------
# DRF coerces: a CharField takes 0 as "0", an IntegerField "3" or 3.0, a BooleanField "yes" or 1.
# The schema promises a JSON type, so a value of another type is refused as the schema says.


# What `str.strip()` removes, listed as a character class that Python and ECMAScript read alike
# (their `\s` differ). Text that may not be blank must hold some other character.
SPACES = "\\t-\\r\\x1c-\\x20\\x85\\xa0\\u1680\\u2000-\\u200a\\u2028\\u2029\\u202f\\u205f\\u3000"
NOT_BLANK = RegexValidator(f"[^{SPACES}]", "This field may not be blank.", code="blank")
# The same rules as JSON Schema patterns, with NUL refused too (PostgreSQL cannot store one, and
# DRF refuses it): what `sagaplatform.schema` documents for every `StrictCharField`.
ANY_TEXT = "^[^\\x00]*$"
NOT_BLANK_TEXT = f"^[^\\x00]*[^\\x00{SPACES}][^\\x00]*$"


class StrictCharField(serializers.CharField):
    """A JSON string, taken as sent: trimming it would accept a string longer than the schema's
    `maxLength`. A field that may not be blank must hold more than spaces (`NOT_BLANK`)."""

    def __init__(self, **kwargs):
        kwargs.setdefault("trim_whitespace", False)
        super().__init__(**kwargs)
        if not self.allow_blank:
            self.validators.append(NOT_BLANK)

    def to_internal_value(self, data):
        if not isinstance(data, str):
            self.fail("invalid")
        return super().to_internal_value(data)


class StrictRegexField(serializers.RegexField):
    """A JSON string matching the pattern, taken as sent (anchor the pattern with `\\Z`: Python's
    `$` also matches before a final newline, the schema's does not)."""

    def __init__(self, regex, **kwargs):
        kwargs.setdefault("trim_whitespace", False)
        super().__init__(regex, **kwargs)

    def to_internal_value(self, data):
        if not isinstance(data, str):
            raise serializers.ValidationError("Not a valid string.", code="invalid")
        return super().to_internal_value(data)


class StrictChoiceField(serializers.ChoiceField):
    """One of the choices, as a JSON string (DRF would take 1 for "1")."""

    def to_internal_value(self, data):
        if not isinstance(data, str):
            self.fail("invalid_choice", input=data)
        return super().to_internal_value(data)


class StrictIntegerField(serializers.IntegerField):
    """A JSON integer: no "3", no 3.0, no true."""

    def to_internal_value(self, data):
        if type(data) is not int:
            self.fail("invalid")
        return super().to_internal_value(data)


class StrictFloatField(serializers.FloatField):
    """A JSON number: no "0.5", no true."""

    def to_internal_value(self, data):
        if type(data) not in (int, float):
            self.fail("invalid")
        return super().to_internal_value(data)


class StrictBooleanField(serializers.BooleanField):
    """A JSON boolean: no "true", no 1."""

    def to_internal_value(self, data):
        if type(data) is not bool:
            self.fail("invalid", input=data)
        return data
