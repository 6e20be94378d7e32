from rest_framework import authentication


class SessionAuthentication(authentication.SessionAuthentication):
    """Session auth that answers an anonymous request with 401 rather than 403."""

    def authenticate_header(self, request) -> str:
        return 'Session realm="api"'
