"""ASGI entry point: HTTP through Django; the live pages' websockets through Channels.

Websockets authenticate with the Django session (AuthMiddlewareStack) and must be opened by a page
of this very site, scheme, host and port (SameOriginValidator), which is what stops another
site's page from opening an operator's socket with the operator's cookie.
"""

import os

from django.core.asgi import get_asgi_application

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "sagaplatform.settings")
django_asgi_app = get_asgi_application()

from channels.auth import AuthMiddlewareStack  # noqa: E402
from channels.routing import ProtocolTypeRouter, URLRouter  # noqa: E402
from django.conf import settings  # noqa: E402
from django.urls import path  # noqa: E402

from orchestration.consumers import DashboardConsumer  # noqa: E402
from orders.consumers import OrderConsumer  # noqa: E402
from sagaplatform.overload import ConcurrencyLimit  # noqa: E402
from sagaplatform.security import SameOriginValidator  # noqa: E402

websocket_urlpatterns = [
    path("ws/dashboard/", DashboardConsumer.as_asgi()),
    path("ws/orders/<str:order_id>/", OrderConsumer.as_asgi()),
]

application = ProtocolTypeRouter(
    {
        "http": ConcurrencyLimit(
            django_asgi_app, limit=settings.WEB_MAX_CONCURRENT_REQUESTS, retry_after=settings.API_RETRY_AFTER
        ),
        "websocket": SameOriginValidator(AuthMiddlewareStack(URLRouter(websocket_urlpatterns))),
    }
)
