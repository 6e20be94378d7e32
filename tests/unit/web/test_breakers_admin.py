"""The circuit breakers' admin page (no model: their state is in Redis): listed on the admin index,
showing each breaker's state, window, failure rate, half-open time, probes and transitions; its
reset and forced opening are for operators only, CSRF-protected, validated, and audited in the
admin's log of actions."""

from __future__ import annotations

import re
import time
from html import unescape

import pytest
from django.contrib.admin.models import LogEntry
from django.test import Client

from sagaplatform.kernel import breakers
from tests.conftest import make_operator, make_user

pytestmark = pytest.mark.django_db(transaction=True, databases="__all__")

PAGE = "/admin/orchestration/breakers/"


@pytest.fixture(autouse=True)
def breaker_on(settings):
    settings.BREAKER_ENABLED = True
    settings.BREAKER_MIN_CALLS = 4
    settings.BREAKER_FAILURE_RATE = 0.5
    settings.BREAKER_OPEN_SECONDS = 30
    settings.BREAKER_HALF_OPEN_PROBES = 2
    breakers.reset()
    yield
    breakers.reset()


def logged_in(user, **kwargs) -> Client:
    client = Client(**kwargs)
    client.force_login(user)
    return client


def row(html: str, name: str) -> str:
    """The breaker's row as text: its state attribute, then each cell (the name's left out)."""
    found = re.search(rf'<tr id="breaker-{name}" data-state="(\w+)">\s*<th.*?</th>(.*?)</tr>', html, re.S)
    assert found, f"no row for {name}"
    text = unescape(re.sub(r"<[^>]+>", " ", found.group(2)))
    return found.group(1) + " " + re.sub(r"\s+", " ", text).strip()


def state(name: str) -> str:
    return breakers.states([name])[name]["state"]


def test_the_page_is_listed_on_the_admin_index_and_shows_each_breaker():
    for ok in (True, False, False, False):
        breakers.record("payments", ok)  # 3 of 4 failed: open
    client = logged_in(make_operator())

    index = client.get("/admin/").content.decode()
    assert f'<a href="{PAGE}"' in index
    assert "Circuit breakers" in index
    assert f'href="{PAGE}"' in client.get("/admin/orchestration/").content.decode()

    response = client.get(PAGE)
    assert response.status_code == 200
    html = response.content.decode()
    payments = row(html, "payments")
    assert payments.startswith("open open 4 3 75.0 %")  # state, calls, failures, rate
    half_opens_in = float(re.search(r"\(in ([\d.]+) s\)", payments).group(1))
    assert 15 < half_opens_in <= 30  # the 30 s open period, less the time this test took
    assert "closed → open (failure_rate)" in payments
    assert "1 time(s)" in payments
    for name in ("orders", "inventory", "shipping", "notifications", "payment_gateway"):
        assert row(html, name).startswith("closed closed 0 0 -")
    assert "Reset (close)" in html


def test_a_half_open_breaker_shows_its_probes(settings):
    settings.BREAKER_OPEN_SECONDS = 0.2
    for _ in range(4):
        breakers.record("shipping", False)
    time.sleep(0.3)  # the open period passes (the breaker's own clock: no way to fake Redis TIME)
    assert breakers.admit("shipping").admitted  # the first probe
    html = logged_in(make_operator()).get(PAGE).content.decode()
    assert row(html, "shipping").startswith("half_open half-open")
    assert "1 of 2 (0 succeeded)" in row(html, "shipping")
    assert "open → half_open (open_period_over)" in row(html, "shipping")


def test_an_operator_resets_and_forces_open_with_a_reason_and_it_is_audited():
    breakers.force("payments", "open", by="test", seconds=3600)
    ops = make_operator("ops")
    client = logged_in(ops)

    response = client.post(PAGE, {"breaker": "payments", "action": "close", "reason": "gateway fixed"})
    assert response.status_code == 302
    assert state("payments") == "closed"
    response = client.post(PAGE, {"breaker": "shipping", "action": "open", "seconds": "120", "reason": "carrier down"})
    assert response.status_code == 302
    shipping = breakers.detail(["shipping"])["shipping"]
    assert shipping["state"] == "open"
    assert 110 < shipping["half_open_at"] - shipping["now"] <= 120
    assert not breakers.admit("shipping").admitted  # it refuses calls now

    entries = list(LogEntry.objects.order_by("action_time"))
    assert [(e.user, e.object_id, e.change_message) for e in entries] == [
        (ops, "payments", "reset (closed), was open: gateway fixed"),
        (ops, "shipping", "forced open for 120 s, was closed: carrier down"),
    ]
    html = client.get(PAGE).content.decode()
    assert "open → closed (user:ops)" in row(html, "payments")
    assert "closed → open (user:ops)" in row(html, "shipping")
    actions = html.split('id="breaker-actions"')[1]
    assert "carrier down" in actions
    assert "gateway fixed" in actions
    assert ">ops<" in actions
    # The admin's own log of actions (the index's Recent actions) has them too.
    assert "circuit breaker shipping" in client.get("/admin/").content.decode()


def test_staff_without_the_operate_permission_see_but_cannot_act():
    breakers.force("payments", "open", by="test", seconds=3600)
    client = logged_in(make_user("viewer", staff=True))

    html = client.get(PAGE).content.decode()
    assert row(html, "payments").startswith("open open")
    assert "Reset (close)" not in html
    assert "Only operators may reset" in html
    assert f'href="{PAGE}"' in client.get("/admin/").content.decode()

    response = client.post(PAGE, {"breaker": "payments", "action": "close", "reason": "let me"})
    assert response.status_code == 403
    assert state("payments") == "open"
    assert not LogEntry.objects.exists()


def test_customers_are_sent_to_the_login_page():
    client = logged_in(make_user("carol"))
    response = client.get(PAGE)
    assert response.status_code == 302
    assert "/admin/login/" in response["Location"]
    assert client.post(PAGE, {"breaker": "payments", "action": "open", "reason": "x"}).status_code == 302
    assert state("payments") == "closed"
    assert "Circuit breakers" not in Client().get("/admin/", follow=True).content.decode()


def test_an_action_needs_the_csrf_token():
    client = logged_in(make_operator(), enforce_csrf_checks=True)
    body = {"breaker": "payments", "action": "open", "seconds": "60", "reason": "drill"}
    assert client.post(PAGE, body).status_code == 403
    assert state("payments") == "closed"

    page = client.get(PAGE)
    token = re.search(r'name="csrfmiddlewaretoken" value="([^"]+)"', page.content.decode()).group(1)
    assert client.post(PAGE, {**body, "csrfmiddlewaretoken": token}).status_code == 302
    assert state("payments") == "open"


@pytest.mark.parametrize(
    ("body", "error"),
    [
        ({"breaker": "payments", "action": "close", "reason": "   "}, "Reason: This field is required."),
        ({"breaker": "payments", "action": "close"}, "Reason: This field is required."),
        ({"breaker": "nosuch", "action": "close", "reason": "x"}, "Breaker: Select a valid choice."),
        ({"breaker": "payments", "action": "half_open", "reason": "x"}, "Action: Select a valid choice."),
        ({"breaker": "payments", "action": "open", "seconds": "0", "reason": "x"}, "Seconds: Ensure this value is"),
        ({"breaker": "payments", "action": "open", "seconds": "1e9", "reason": "x"}, "Seconds: Ensure this value is"),
        ({"breaker": "payments", "action": "open", "seconds": "soon", "reason": "x"}, "Seconds: Enter a number."),
    ],
)
def test_bad_input_is_refused_with_a_clear_message_and_changes_nothing(body, error):
    client = logged_in(make_operator())
    response = client.post(PAGE, body)
    assert response.status_code == 400
    assert error in response.content.decode()
    assert state("payments") == "closed"
    assert not LogEntry.objects.exists()
