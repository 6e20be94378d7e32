"""How API clients authenticate: tokens, the session (with CSRF), HTTP Basic; and what a bad
credential gets."""

from __future__ import annotations

import base64

import pytest
from django.middleware.csrf import _get_new_csrf_string
from rest_framework.authtoken.models import Token
from rest_framework.test import APIClient

from orchestration.models import Saga
from orders.models import Order
from tests.conftest import deliver_until, order_body

pytestmark = pytest.mark.django_db(databases="__all__")

TOKEN_URL = "/api/auth/token/"
ORDERS = "/api/orders/"


def get_token(username: str, password: str):
    return APIClient().post(TOKEN_URL, {"username": username, "password": password}, format="json")


def token_client(key: str, keyword: str = "Token") -> APIClient:
    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION=f"{keyword} {key}")
    return client


def session_client(user, *, with_csrf: bool) -> APIClient:
    """A logged-in browser: the session cookie, and the CSRF cookie and header when `with_csrf`."""
    client = APIClient(enforce_csrf_checks=True)
    client.force_login(user)
    if with_csrf:
        secret = _get_new_csrf_string()
        client.cookies["csrftoken"] = secret
        client.credentials(HTTP_X_CSRFTOKEN=secret)
    return client


def orders() -> int:
    return Order.objects.using("orders").count()


# --- tokens ------------------------------------------------------------------------------------


def test_a_customer_exchanges_username_and_password_for_a_token_that_works(alice, catalogue, broker):
    response = get_token("alice", "alice-pass")

    assert response.status_code == 200
    key = response.json()["token"]
    assert Token.objects.get(user=alice).key == key
    listed = token_client(key).get(ORDERS)
    assert listed.status_code == 200
    # The same token again until it is revoked.
    assert get_token("alice", "alice-pass").json()["token"] == key


@pytest.mark.parametrize(
    ("username", "password"),
    [("alice", "wrong"), ("nobody", "alice-pass"), ("alice", "ALICE-PASS"), ("alice", "alice-pass ")],
)
def test_wrong_credentials_get_no_token(alice, username, password):
    response = get_token(username, password)

    assert response.status_code == 400
    assert response.json()["code"] == "invalid_credentials"
    assert not Token.objects.exists()


def test_an_inactive_user_gets_no_token(alice):
    alice.is_active = False
    alice.save()

    assert get_token("alice", "alice-pass").json()["code"] == "invalid_credentials"
    assert not Token.objects.exists()


@pytest.mark.parametrize("body", [{}, {"username": "alice"}, {"password": "x"}, {"username": ["alice"], "password": 1}])
def test_a_malformed_token_request_is_a_400(alice, body):
    response = APIClient().post(TOKEN_URL, body, format="json")

    assert response.status_code == 400
    assert response.json()["code"] == "invalid_request"


def test_the_bearer_keyword_works_too(alice):
    key = get_token("alice", "alice-pass").json()["token"]

    assert token_client(key, "Bearer").get(ORDERS).status_code == 200


@pytest.mark.parametrize(
    "header",
    ["Token 0123456789abcdef0123456789abcdef01234567", "Token", "Token a b", "Bearer nope", "Token \xe9t\xe9"],
)
def test_a_bad_token_is_a_401_with_a_challenge_and_changes_nothing(alice, catalogue, broker, header):
    get_token("alice", "alice-pass")
    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION=header)

    listed = client.get(ORDERS)
    placed = client.post(ORDERS, order_body(), format="json")

    for response in (listed, placed):
        assert response.status_code == 401
        assert response.json()["code"] == "authentication_failed"
        assert response["WWW-Authenticate"] == 'Token realm="api"'
    assert orders() == 0


def test_an_anonymous_request_is_challenged(catalogue):
    response = APIClient().get(ORDERS)

    assert response.status_code == 401
    assert response.json()["code"] == "not_authenticated"
    assert response["WWW-Authenticate"] == 'Token realm="api"'


def test_a_revoked_token_stops_working(alice):
    key = get_token("alice", "alice-pass").json()["token"]
    client = token_client(key)

    assert client.delete(TOKEN_URL).status_code == 204

    assert not Token.objects.exists()
    assert client.get(ORDERS).status_code == 401
    assert APIClient().delete(TOKEN_URL).status_code == 401
    assert get_token("alice", "alice-pass").json()["token"] != key


def test_a_token_from_an_inactive_user_stops_working(alice):
    key = get_token("alice", "alice-pass").json()["token"]
    alice.is_active = False
    alice.save()

    assert token_client(key).get(ORDERS).status_code == 401


def test_asking_for_tokens_is_throttled_per_client_address(alice):
    # Right passwords: wrong ones would meet the login lockout first (tests/unit/api/test_security.py).
    answers = [get_token("alice", "alice-pass").status_code for _ in range(10)]
    throttled = get_token("alice", "alice-pass")

    assert answers == [200] * 10
    assert throttled.status_code == 429
    assert throttled.json()["code"] == "throttled"
    assert int(throttled["Retry-After"]) == throttled.json()["details"]["retry_after"] > 0
    assert "token" not in throttled.json()


# --- CSRF --------------------------------------------------------------------------------------


def test_a_session_post_without_the_csrf_token_is_refused_and_places_nothing(alice, catalogue, broker):
    response = session_client(alice, with_csrf=False).post(ORDERS, order_body(), format="json")

    assert response.status_code == 403
    assert response.json()["code"] == "csrf_failed"
    assert "CSRF" in response.json()["message"]
    assert orders() == 0
    assert broker.queue == []


def test_a_session_post_with_the_csrf_token_places_the_order(alice, catalogue, broker):
    client = session_client(alice, with_csrf=True)

    assert client.get(ORDERS).status_code == 200  # reading needs no CSRF token
    response = client.post(ORDERS, order_body(), format="json")

    assert response.status_code == 202
    assert orders() == 1


@pytest.mark.django_db(transaction=True, databases="__all__")
def test_a_session_cancel_without_the_csrf_token_is_refused_and_cancels_nothing(alice, alice_api, catalogue, broker):
    receipt = alice_api.post(ORDERS, order_body(), format="json").json()
    deliver_until(broker, "payments.execute")
    before = Saga.objects.get(id=receipt["saga"]["id"])
    assert before.state == "running"

    response = session_client(alice, with_csrf=False).post(f"{receipt['url']}cancel/", {}, format="json")

    assert response.status_code == 403
    assert response.json()["code"] == "csrf_failed"
    after = Saga.objects.get(id=receipt["saga"]["id"])
    assert (after.state, after.version) == (before.state, before.version)


def test_a_session_token_revocation_needs_the_csrf_token(alice):
    get_token("alice", "alice-pass")

    refused = session_client(alice, with_csrf=False).delete(TOKEN_URL)

    assert (refused.status_code, refused.json()["code"]) == (403, "csrf_failed")
    assert Token.objects.filter(user=alice).exists()
    assert session_client(alice, with_csrf=True).delete(TOKEN_URL).status_code == 204


@pytest.mark.parametrize("scheme", ["token", "basic"])
def test_token_and_basic_authentication_need_no_csrf_token(alice, catalogue, broker, scheme):
    if scheme == "token":
        header = f"Token {get_token('alice', 'alice-pass').json()['token']}"
    else:
        header = "Basic " + base64.b64encode(b"alice:alice-pass").decode()
    client = APIClient(enforce_csrf_checks=True)
    client.credentials(HTTP_AUTHORIZATION=header)

    response = client.post(ORDERS, order_body(), format="json")

    assert response.status_code == 202
    assert orders() == 1


def test_a_wrong_basic_password_is_a_401(alice, catalogue, broker):
    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION="Basic " + base64.b64encode(b"alice:nope").decode())

    response = client.post(ORDERS, order_body(), format="json")

    assert (response.status_code, response.json()["code"]) == (401, "authentication_failed")
    assert orders() == 0
