"""Who may do what: every endpoint and method, for every kind of caller.

Callers: anonymous; alice, the customer who owns the order; bob, another customer; an operator
(staff with `orchestration.operate_saga`); staff without that permission; a superuser. Each case
asserts the exact status, and that a refused request (and any read) changed nothing anywhere:
orders, keys, outboxes, sagas and their steps, events and alerts, stock, fault rules, tokens.
An allowed write must change something, so the matrix cannot pass by refusing everything.
Each endpoint builds one world, and the callers take turns on it: what each request wrote is
rolled back before the next.
"""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import Iterator
from dataclasses import dataclass

import pytest
from django.conf import settings
from django.contrib.auth import get_user_model
from django.db import transaction
from rest_framework.authtoken.models import Token
from rest_framework.test import APIClient

from inventory.models import StockItem
from orchestration import engine
from orchestration.models import Alert, AlertChannel, Saga, SagaEvent, SagaStep
from orders.models import IdempotencyKey, Order
from sagaplatform.kernel.models import FaultRule, OutboxMessage
from tests.conftest import make_operator, make_user, order_body

pytestmark = pytest.mark.django_db(databases="__all__")

PERSONAS = ("anonymous", "alice", "bob", "operator", "staff", "superuser")


@pytest.fixture(autouse=True)
def _fast_passwords(settings):
    # Six users per case, over a hundred cases: the default hasher is slow on purpose.
    settings.PASSWORD_HASHERS = ["django.contrib.auth.hashers.MD5PasswordHasher"]


@dataclass
class World:
    users: dict
    order: dict
    running_saga: str
    parked_saga: str
    fault: FaultRule
    channel: AlertChannel


def start_saga(context: dict) -> str:
    saga_id = str(uuid.uuid4())
    engine.saga_start(saga_id=saga_id, definition="place_order", context=context)
    return saga_id


@pytest.fixture
def world(alice, bob, alice_api, catalogue, broker) -> World:
    superuser = get_user_model().objects.create_superuser("root", "root@example.com", "root-pass")
    order = alice_api.post("/api/orders/", order_body(), format="json", HTTP_IDEMPOTENCY_KEY="k1").json()
    context = {"order_id": order["id"], "customer_email": "alice@example.com", "mode": "orchestrated"}
    running = start_saga(context)
    parked = start_saga({**context, "order_id": str(uuid.uuid4())})
    # A compensation that gave up: what retry and skip are for.
    Saga.objects.filter(id=parked).update(state="parked")
    SagaStep.objects.filter(saga_id=parked, name="reserve_stock").update(state="succeeded")
    SagaStep.objects.filter(saga_id=parked, name="charge_payment").update(state="compensation_failed")
    Alert.objects.create(saga_id=parked, kind="saga_parked", message="charge_payment gave up")
    fault = FaultRule.objects.using("payments").create(service="payments", operation="charge", failure_rate=0.5)
    users = {
        "anonymous": None,
        "alice": alice,
        "bob": bob,
        "operator": make_operator("ops"),
        "staff": make_user("staff", staff=True),
        "superuser": superuser,
    }
    channel = AlertChannel.objects.create(name="ops-mail", kind="email", target="ops@example.com")
    return World(users=users, order=order, running_saga=running, parked_saga=parked, fault=fault, channel=channel)


def client_for(world: World, persona: str) -> APIClient:
    client = APIClient()
    if world.users[persona] is not None:
        client.force_authenticate(world.users[persona])
    return client


def snapshot() -> dict:
    """Everything any endpoint could change."""
    return {
        "orders": sorted(Order.objects.using("orders").values_list("id", "status")),
        "keys": IdempotencyKey.objects.using("orders").count(),
        "outbox": {alias: OutboxMessage.objects.using(alias).count() for alias in settings.DATABASE_ALIASES},
        "sagas": sorted(Saga.objects.values_list("id", "state", "version")),
        "steps": sorted(SagaStep.objects.values_list("id", "state", "attempts", "compensation_attempts")),
        "events": SagaEvent.objects.count(),
        "alerts": sorted(Alert.objects.values_list("id", "resolved_at")),
        "stock": sorted(StockItem.objects.using("inventory").values_list("sku", "on_hand", "reserved", "version")),
        "faults": {alias: FaultRule.objects.using(alias).count() for alias in settings.SERVICE_ALIASES},
        "tokens": Token.objects.count(),
        "alert_channels": sorted(AlertChannel.objects.values_list("id", "name", "target", "enabled")),
    }


def row(anonymous, alice, bob, operator, staff, superuser) -> dict[str, int]:
    return dict(zip(PERSONAS, (anonymous, alice, bob, operator, staff, superuser), strict=True))


# (name, method, path, body, {persona: status}). Paths name the world's objects in braces.
MATRIX = [
    ("orders list", "get", "/api/orders/", None, row(401, 200, 200, 200, 200, 200)),
    ("order create", "post", "/api/orders/", order_body(), row(401, 202, 202, 202, 202, 202)),
    ("order detail", "get", "/api/orders/{order}/", None, row(401, 200, 404, 404, 404, 404)),
    ("order cancel", "post", "/api/orders/{order}/cancel/", {"reason": "x"}, row(401, 202, 404, 404, 404, 404)),
    ("order replace", "put", "/api/orders/{order}/", order_body(), row(401, 405, 405, 405, 405, 405)),
    ("order delete", "delete", "/api/orders/{order}/", None, row(401, 405, 405, 405, 405, 405)),
    ("stock list", "get", "/api/inventory/", None, row(401, 200, 200, 200, 200, 200)),
    ("stock detail", "get", "/api/inventory/SKU-MUG/", None, row(401, 200, 200, 200, 200, 200)),
    ("stock change", "post", "/api/inventory/", {"sku": "SKU-MUG"}, row(401, 405, 405, 405, 405, 405)),
    ("saga list", "get", "/api/sagas/", None, row(401, 403, 403, 200, 403, 200)),
    ("saga detail", "get", "/api/sagas/{running}/", None, row(401, 403, 403, 200, 403, 200)),
    ("saga retry", "post", "/api/sagas/{parked}/retry/", {"reason": "fixed"}, row(401, 403, 403, 202, 403, 202)),
    (
        "saga skip",
        "post",
        "/api/sagas/{parked}/skip/",
        {"step": "charge_payment", "reason": "refunded by hand"},
        row(401, 403, 403, 202, 403, 202),
    ),
    ("saga cancel", "post", "/api/sagas/{running}/cancel/", {"reason": "fraud"}, row(401, 403, 403, 202, 403, 202)),
    ("saga delete", "delete", "/api/sagas/{running}/", None, row(401, 403, 403, 405, 403, 405)),
    ("faults list", "get", "/api/faults/", None, row(401, 403, 403, 403, 403, 200)),
    (
        "fault create",
        "post",
        "/api/faults/",
        {"service": "inventory", "operation": "reserve", "fail_first": 1},
        row(401, 403, 403, 403, 403, 201),
    ),
    ("fault delete", "delete", "/api/faults/payments/{fault}/", None, row(401, 403, 403, 403, 403, 204)),
    (
        "token create",
        "post",
        "/api/auth/token/",
        {"username": "alice", "password": "alice-pass"},
        row(200, 200, 200, 200, 200, 200),
    ),
    ("token revoke", "delete", "/api/auth/token/", None, row(401, 204, 204, 204, 204, 204)),
    ("alert channels", "get", "/api/alerts/channels/", None, row(401, 403, 403, 200, 403, 200)),
    (
        "alert channel create",
        "post",
        "/api/alerts/channels/",
        {"name": "oncall", "kind": "email", "target": "oncall@example.com"},
        row(401, 403, 403, 201, 403, 201),
    ),
    ("alert channel", "get", "/api/alerts/channels/{channel}/", None, row(401, 403, 403, 200, 403, 200)),
    (
        "alert channel change",
        "patch",
        "/api/alerts/channels/{channel}/",
        {"enabled": False},
        row(401, 403, 403, 200, 403, 200),
    ),
    ("alert channel delete", "delete", "/api/alerts/channels/{channel}/", None, row(401, 403, 403, 204, 403, 204)),
    ("alert notifications", "get", "/api/alerts/notifications/", None, row(401, 403, 403, 200, 403, 200)),
    ("schema", "get", "/api/schema/", None, row(200, 200, 200, 200, 200, 200)),
    ("docs", "get", "/api/docs/", None, row(200, 200, 200, 200, 200, 200)),
]

# Allowed writes that may legitimately change nothing (revoking a token one never had).
MAY_BE_A_NO_OP = {"token revoke"}


class _Undo(Exception):
    pass


@contextlib.contextmanager
def undone() -> Iterator[None]:
    """Whatever the block writes to any database is rolled back when it ends (each persona
    meets the same world; the block reads what changed before that)."""
    try:
        with contextlib.ExitStack() as stack:
            for alias in settings.DATABASE_ALIASES:
                stack.enter_context(transaction.atomic(using=alias))
            yield
            raise _Undo
    except _Undo:
        pass


@pytest.mark.parametrize(("name", "method", "path", "body", "expected"), [pytest.param(*c, id=c[0]) for c in MATRIX])
def test_permission_matrix(world, name, method, path, body, expected):
    url = path.format(
        order=world.order["id"],
        running=world.running_saga,
        parked=world.parked_saga,
        fault=world.fault.id,
        channel=world.channel.id,
    )
    for persona in PERSONAS:
        before = snapshot()
        with undone():
            response = getattr(client_for(world, persona), method)(url, body, format="json")
            after = snapshot()
        assert snapshot() == before, persona  # undone for the next persona

        assert response.status_code == expected[persona], (persona, response.content)
        if expected[persona] >= 400 or method == "get":
            assert after == before, persona
        elif name not in MAY_BE_A_NO_OP:
            assert after != before, persona
        if expected[persona] >= 400:
            error = response.json()
            assert set(error) == {"code", "message", "details"}, persona
            assert (
                error["code"]
                == {
                    401: "not_authenticated",
                    403: "permission_denied",
                    404: "not_found",
                    405: "method_not_allowed",
                }[expected[persona]]
            ), persona


def test_a_customer_lists_only_their_own_orders(world):
    bobs = client_for(world, "bob").get("/api/orders/").json()
    operators = client_for(world, "operator").get("/api/orders/").json()

    assert bobs["count"] == operators["count"] == 0
    assert [o["id"] for o in client_for(world, "alice").get("/api/orders/").json()["results"]] == [world.order["id"]]


def test_staff_with_only_the_view_permission_on_faults_may_list_but_not_change_them(world):
    from django.contrib.auth.models import Permission

    viewer = make_user("viewer", staff=True)
    viewer.user_permissions.add(Permission.objects.get(content_type__app_label="kernel", codename="view_faultrule"))
    client = APIClient()
    client.force_authenticate(get_user_model().objects.get(pk=viewer.pk))
    before = snapshot()

    listed = client.get("/api/faults/")
    created = client.post("/api/faults/", {"service": "inventory", "operation": "reserve"}, format="json")
    deleted = client.delete(f"/api/faults/payments/{world.fault.id}/")

    assert listed.status_code == 200
    assert [r["id"] for r in listed.json()["results"]] == [world.fault.id]
    assert created.status_code == deleted.status_code == 403
    assert snapshot() == before


def test_an_inactive_operator_is_refused(world):
    operator = world.users["operator"]
    operator.is_active = False
    operator.save()
    client = APIClient()
    client.login(username="ops", password="ops-pass")  # refused: the client stays anonymous
    before = snapshot()

    response = client.post(f"/api/sagas/{world.running_saga}/cancel/", {"reason": "x"}, format="json")

    assert response.status_code == 401
    assert snapshot() == before
