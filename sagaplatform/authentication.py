"""How an API request proves who sent it: an API token, the session cookie, or HTTP Basic.

The endpoint that issues tokens is in `auth_apis`: DRF imports this module while it loads
`rest_framework.views`, so it cannot define views itself.
"""

from __future__ import annotations

from drf_spectacular.extensions import OpenApiAuthenticationExtension
from rest_framework import authentication, exceptions


class CsrfFailed(exceptions.PermissionDenied):
    default_code = "csrf_failed"


class SessionAuthentication(authentication.SessionAuthentication):
    """The browser's session cookie. Every unsafe request it authenticates must carry the CSRF
    token, refused otherwise with `403 csrf_failed` (DRF says a generic `permission_denied`)."""

    def enforce_csrf(self, request) -> None:
        try:
            super().enforce_csrf(request)
        except exceptions.PermissionDenied as exc:
            raise CsrfFailed(exc.detail) from None


class TokenAuthentication(authentication.TokenAuthentication):
    """`Authorization: Token <key>` (DRF's scheme) or `Authorization: Bearer <key>` (RFC 6750's).

    Needs no CSRF token: a browser never adds this header on its own, so a forged cross-site
    request cannot carry it. First in `DEFAULT_AUTHENTICATION_CLASSES`, so every 401 challenges
    with `WWW-Authenticate: Token realm="api"` (not Basic, which would pop up a browser dialog).
    """

    keywords = (b"token", b"bearer")

    def authenticate(self, request):
        parts = authentication.get_authorization_header(request).split()
        if not parts or parts[0].lower() not in self.keywords:
            return None
        if len(parts) != 2:
            raise exceptions.AuthenticationFailed("Invalid token header: expected `Token <key>`.")
        try:
            key = parts[1].decode()
        except UnicodeError:
            raise exceptions.AuthenticationFailed("Invalid token header: the key is not ASCII.") from None
        return self.authenticate_credentials(key)

    def authenticate_header(self, request) -> str:
        return 'Token realm="api"'


class TokenScheme(OpenApiAuthenticationExtension):
    target_class = TokenAuthentication
    name = "tokenAuth"

    def get_security_definition(self, auto_schema):
        return {
            "type": "apiKey",
            "in": "header",
            "name": "Authorization",
            "description": "`Token <key>` (or `Bearer <key>`), the key from `POST /api/auth/token/`.",
        }


class SessionScheme(OpenApiAuthenticationExtension):
    """Documents the session cookie in the OpenAPI schema."""

    target_class = SessionAuthentication
    name = "cookieAuth"

    def get_security_definition(self, auto_schema):
        return {
            "type": "apiKey",
            "in": "cookie",
            "name": "sessionid",
            "description": "A logged-in browser's session. Unsafe methods also need the `X-CSRFToken` header.",
        }
