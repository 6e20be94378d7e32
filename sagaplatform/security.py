"""What stands between the network and a password or a live socket: the login lockout (django-axes,
configured in settings) and the websocket Origin check.

Settings name these by their dotted path, so nothing here is imported before Django is ready.
"""

from __future__ import annotations

from urllib.parse import urlsplit

from axes.backends import AxesStandaloneBackend
from axes.helpers import get_cool_off
from channels.security.websocket import WebsocketDenier
from django.conf import settings
from django.contrib.auth.forms import AuthenticationForm
from django.http import JsonResponse
from django.http.request import split_domain_port, validate_host
from django.shortcuts import render
from rest_framework.throttling import BaseThrottle

LOCKOUT_CODE = "too_many_failed_logins"


def client_address(request) -> str:
    """The client's address as the API throttles see it: `API_NUM_PROXIES` decides whether
    X-Forwarded-For is trusted, so a lockout cannot be dodged by forging that header."""
    return BaseThrottle().get_ident(request)


class LockoutBackend(AxesStandaloneBackend):
    """Refuses every password check for a locked username or address (before the costly hash).

    A check with no request (the test client's `login()`, a shell) comes from no network client,
    so there is nothing to count it against; axes would raise instead."""

    def authenticate(self, request, username=None, password=None, **kwargs):
        if request is None:
            return None
        return super().authenticate(request, username, password, **kwargs)


def lockout_seconds(request=None) -> int:
    return int(get_cool_off(request).total_seconds())


def lockout_response(request, *_):
    """The answer to a password check refused by the lockout: JSON under /api/, the login form
    with the reason elsewhere. Both are 429 with Retry-After.

    Only the request is read: axes 8's async middleware passes (request, credentials) where its
    sync one passes (request, response, credentials)."""
    seconds = lockout_seconds(request)
    minutes = max(1, round(seconds / 60))
    message = f"Too many failed logins for this user or from this address. Try again in {minutes} minutes."
    headers = {"Retry-After": str(seconds)}
    if request.path.startswith("/api/"):
        message += " An API token keeps working meanwhile."
        body = {"code": LOCKOUT_CODE, "message": message, "details": {"retry_after": seconds}}
        return JsonResponse(body, status=429, headers=headers)
    form = AuthenticationForm(request, initial={"username": request.POST.get("username", "")})
    context = {"form": form, "lockout": message, "next": request.POST.get("next", "")}
    response = render(request, "registration/login.html", context, status=429)
    response["Retry-After"] = headers["Retry-After"]
    return response


# --- Websockets ---------------------------------------------------------------------------------

_DEFAULT_PORTS = {"http": 80, "https": 443}


def _origin(url: str) -> tuple[str, str, int] | None:
    try:
        parts = urlsplit(url)
        port = parts.port or _DEFAULT_PORTS.get(parts.scheme)
    except ValueError:  # a port that is not a number
        return None
    if parts.scheme not in _DEFAULT_PORTS or not parts.hostname or port is None:
        return None
    return parts.scheme, parts.hostname.lower(), port


def _trusted(origin: tuple[str, str, int], entry: str) -> bool:
    """An entry of CSRF_TRUSTED_ORIGINS, `https://*.example.com` meaning any subdomain, as Django reads it."""
    wildcard = "://*." in entry
    expected = _origin(entry.replace("://*.", "://", 1))
    if expected is None or not wildcard:
        return origin == expected
    scheme, host, port = expected
    return origin[0] == scheme and origin[2] == port and origin[1].endswith("." + host)


def websocket_origin_allowed(scope) -> bool:
    """The same rule as Django's CSRF check of a form's Origin: the page that opens the socket
    must be this site (scheme, host and port of the Host header, the host in ALLOWED_HOSTS), or
    an origin in CSRF_TRUSTED_ORIGINS. Comparing host names only (channels'
    AllowedHostsOriginValidator) let any other service on the same host open an operator's socket
    with the operator's cookie."""
    headers = {name: value.decode("latin1") for name, value in scope.get("headers", [])}
    origin = _origin(headers.get(b"origin", ""))
    if origin is None:
        return False
    if any(_trusted(origin, entry) for entry in settings.CSRF_TRUSTED_ORIGINS):
        return True
    host = headers.get(b"host", "")
    domain, _ = split_domain_port(host)
    if not domain or not validate_host(domain, settings.ALLOWED_HOSTS):
        return False
    secure = scope.get("scheme") == "wss"
    proxy_header = getattr(settings, "SECURE_PROXY_SSL_HEADER", None)
    if proxy_header:
        name, value = proxy_header
        forwarded = headers.get(name.removeprefix("HTTP_").lower().replace("_", "-").encode())
        if forwarded is not None:  # as HttpRequest.is_secure() reads it
            secure = forwarded.split(",", 1)[0].strip() == value
    return origin == _origin(f"{'https' if secure else 'http'}://{host}")


class SameOriginValidator:
    """ASGI middleware for websockets: refuse the handshake unless `websocket_origin_allowed`."""

    def __init__(self, application) -> None:
        self.application = application

    async def __call__(self, scope, receive, send):
        if websocket_origin_allowed(scope):
            return await self.application(scope, receive, send)
        return await WebsocketDenier()(scope, receive, send)
