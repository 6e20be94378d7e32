"""How an API request proves who sent it: an API token, the session cookie, or HTTP Basic.

The endpoint that issues tokens is in `auth_apis`: DRF imports this module while it loads
`rest_framework.views`, so it cannot define views itself.
"""

from __future__ import annotations

from django.conf import settings
from django.contrib.auth import get_user_model
from django.core.cache.backends.locmem import LocMemCache
from django.utils.crypto import constant_time_compare, salted_hmac
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


# Successful HTTP Basic checks, in this process's memory only: a shared cache (Redis) would hold
# keyed hashes of live passwords where more processes, and their operators, can read them.
_basic_checked = LocMemCache("sagaplatform-basic-auth", {"OPTIONS": {"MAX_ENTRIES": 10_000}})


def _password_fingerprint(user) -> str:
    return salted_hmac("sagaplatform.basic-auth.password", user.password, algorithm="sha256").hexdigest()


class BasicAuthentication(authentication.BasicAuthentication):
    """HTTP Basic, for scripts and curl.

    A password check costs a PBKDF2 hash (about a quarter of a second of CPU here), on every
    request. So a successful check is remembered for API_BASIC_AUTH_CACHE_SECONDS, under an HMAC
    of the username and password keyed with SECRET_KEY (the password is never stored). The entry
    holds the user's id and a fingerprint of the stored password hash: a changed password or a
    deactivated user stops working at once. A wrong password is never remembered, so every guess
    is still checked and counted by the lockout (`sagaplatform.security`).
    """

    def authenticate_credentials(self, userid, password, request=None):
        credentials = f"{len(userid)}:{userid}:{password}"  # unambiguous, whatever the two contain
        key = salted_hmac("sagaplatform.basic-auth", credentials, algorithm="sha256").hexdigest()
        remembered = _basic_checked.get(key)
        if remembered is not None:
            user_id, fingerprint = remembered
            user = get_user_model()._default_manager.filter(pk=user_id, is_active=True).first()
            if user is not None and constant_time_compare(fingerprint, _password_fingerprint(user)):
                return user, None
        # The lockout marks Django's request (its middleware reads it), not DRF's wrapper.
        user, _ = super().authenticate_credentials(userid, password, getattr(request, "_request", request))
        if settings.API_BASIC_AUTH_CACHE_SECONDS > 0:
            _basic_checked.set(key, (user.pk, _password_fingerprint(user)), settings.API_BASIC_AUTH_CACHE_SECONDS)
        return user, None


class BasicScheme(OpenApiAuthenticationExtension):
    """Documents HTTP Basic in the OpenAPI schema."""

    target_class = BasicAuthentication
    name = "basicAuth"

    def get_security_definition(self, auto_schema):
        return {
            "type": "http",
            "scheme": "basic",
            "description": "Username and password. Each check costs the server a slow hash: prefer a token.",
        }
