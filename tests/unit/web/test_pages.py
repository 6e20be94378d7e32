"""The customer's HTML pages through Django's test client: login, the order list, the order form
(errors, idempotent double submit), the order page and the no-JavaScript cancel form."""

from __future__ import annotations

import re
import threading
import uuid
from concurrent.futures import ThreadPoolExecutor

import pytest
from django.conf import settings
from django.contrib.staticfiles import finders
from django.db import connections
from django.test import Client

from orchestration.models import Saga
from orders import services
from orders import views as orders_views
from orders.exceptions import IdempotencyKeyInFlight
from orders.models import IdempotencyKey, Order, Product
from tests.conftest import ADDRESS, mug, order_body

pytestmark = pytest.mark.django_db(transaction=True, databases="__all__")

START_SAGA = "orchestration.start_saga"


def client_for(user) -> Client:
    client = Client()
    client.force_login(user)
    return client


def form_data(key: str = "key-1", **overrides) -> dict:
    data = {
        "qty_SKU-MUG": "2",
        "qty_SKU-BOOK": "0",
        "qty_SKU-LAMP": "",
        "token": "tok_visa",
        "mode": "orchestrated",
        "idempotency_key": key,
        **{field: ADDRESS[field] for field in ("name", "line1", "city", "postal_code", "country")},
    }
    data.update(overrides)
    return data


def messages_of(response) -> list[str]:
    return [str(m) for m in response.context["messages"]]


def place(client, **overrides) -> Order:
    response = client.post("/orders/new/", form_data(**overrides))
    assert response.status_code == 302, response.content.decode()[:2000]
    order_id = re.fullmatch(r"/orders/([0-9a-f-]{36})/", response["Location"]).group(1)
    return Order.objects.using("orders").get(id=order_id)


# --- Login and logout ---------------------------------------------------------------------------


@pytest.mark.parametrize("path", ["/orders/", "/orders/new/", "/orders/7c3f6a8e-3a56-4e2b-9d0c-3d0a8b0f1b2c/"])
def test_pages_send_an_anonymous_visitor_to_the_login_page(client, path):
    response = client.get(path)

    assert response.status_code == 302
    assert response["Location"] == f"/accounts/login/?next={path}"


def test_anonymous_cancel_post_changes_nothing_and_asks_to_log_in(client, alice, catalogue, broker):
    order = place(client_for(alice))

    response = client.post(f"/orders/{order.id}/cancel/")

    assert response.status_code == 302
    assert response["Location"].startswith("/accounts/login/")
    assert not Saga.objects.filter(id=order.saga_id).exists()  # not started, so not cancelled either


def test_login_then_logout(client, alice):
    page = client.get("/accounts/login/")
    assert page.status_code == 200
    assert b'name="username"' in page.content
    assert b'name="password"' in page.content

    wrong = client.post("/accounts/login/", {"username": "alice", "password": "nope"})
    assert wrong.status_code == 200
    assert b'role="alert"' in wrong.content

    response = client.post("/accounts/login/", {"username": "alice", "password": "alice-pass"})
    assert response.status_code == 302
    assert response["Location"] == "/orders/"
    assert b"Signed in as <strong>alice</strong>" in client.get("/orders/").content

    assert client.get("/accounts/logout/").status_code == 405  # logging out is a POST (CSRF)
    response = client.post("/accounts/logout/")
    assert response.status_code == 302
    assert response["Location"] == "/"
    assert client.get("/orders/").status_code == 302


def test_login_returns_to_the_page_asked_for(client, alice):
    response = client.post("/accounts/login/", {"username": "alice", "password": "alice-pass", "next": "/orders/new/"})

    assert response["Location"] == "/orders/new/"


def test_staff_see_the_dashboard_link_and_customers_do_not(alice, django_user_model):
    operator = django_user_model.objects.create_user("ops", "ops@example.com", "ops-pass", is_staff=True)

    assert b'href="/dashboard/"' not in client_for(alice).get("/orders/").content
    assert b'href="/dashboard/"' in client_for(operator).get("/orders/").content


# --- Placing an order -------------------------------------------------------------------------


def test_the_form_lists_the_catalogue_with_prices_and_stock(alice, catalogue):
    response = client_for(alice).get("/orders/new/", follow=True)

    assert response.status_code == 200
    html = response.content.decode()
    assert "12.50 EUR" in html
    assert "50 in stock" in html
    assert "10 in stock" in html
    key = re.search(r'name="idempotency_key" value="([0-9a-f]{32})"', html).group(1)
    # Each new form has its own key, in its address: two forms are two orders.
    assert response.redirect_chain == [(f"/orders/new/{uuid.UUID(key)}/", 302)]
    assert f'action="/orders/new/{uuid.UUID(key)}/"' in html
    assert key not in client_for(alice).get("/orders/new/", follow=True).content.decode()


def test_the_country_is_chosen_from_the_iso_list_not_cut_to_two_letters(alice, catalogue):
    """A two-letter box (maxlength=2) cut "Germany" to "GE", Georgia, without a word."""
    html = client_for(alice).get("/orders/new/", follow=True).content.decode()

    assert re.search(r'<select name="country"[^>]*id="id_country"', html)
    assert '<option value="DE">Germany</option>' in html
    assert '<option value="GE">Georgia</option>' in html
    assert 'maxlength="2"' not in html


def test_back_then_submit_again_shows_the_order_already_placed(alice, catalogue, broker):
    """Back returns to the history entry of the form (the page is rendered again, the browser
    restores what the customer typed): the key must be that form's, not a fresh one."""
    client = client_for(alice)
    form_page = client.get("/orders/new/", follow=True).request["PATH_INFO"]
    key = re.search(r'name="idempotency_key" value="([0-9a-f]{32})"', client.get(form_page).content.decode())[1]
    first = client.post(form_page, form_data(key))
    assert first.status_code == 302

    back = client.get(form_page).content.decode()  # Back: the same address, rendered again
    restored_key = re.search(r'name="idempotency_key" value="([0-9a-f]{32})"', back)[1]
    again = client.post(form_page, form_data(restored_key))

    assert Order.objects.using("orders").count() == 1
    assert again["Location"] == first["Location"]
    assert len([m for m in broker.queue if m["task"] == START_SAGA]) == 1
    assert "You already placed" in back
    assert first["Location"] in back
    assert messages_of(client.get(again["Location"]))[-1] == "This order was already placed: here it is."


def test_placing_an_order_goes_through_the_api_service(alice, catalogue, broker):
    client = client_for(alice)

    order = place(client, **{"qty_SKU-BOOK": "1", "country": "fr", "mode": "parallel"})

    assert order.customer_id == alice.id
    assert {(line.sku, line.quantity) for line in order.lines.all()} == {("SKU-MUG", 2), ("SKU-BOOK", 1)}
    assert str(order.total) == "69.00"
    assert order.mode == "parallel"
    assert order.shipping_address["country"] == "FR"
    assert "line2" not in order.shipping_address
    assert "phone" not in order.shipping_address
    assert IdempotencyKey.objects.using("orders").get(order=order).key == "key-1"
    # The saga starts as for an API order: one start message, from the outbox.
    [start] = [m for m in broker.queue if m["task"] == START_SAGA]
    assert start["payload"]["saga_id"] == str(order.saga_id)
    assert start["payload"]["context"]["payment_method"].startswith("pm_")
    assert "payment_token" not in start["payload"]["context"]
    detail = client.get(f"/orders/{order.id}/")
    assert messages_of(detail) == [orders_views.ORDER_RECEIVED]


def test_a_double_submit_places_one_order(alice, catalogue, broker):
    client = client_for(alice)

    first = place(client)
    second = client.post("/orders/new/", form_data())

    assert second.status_code == 302
    assert second["Location"] == f"/orders/{first.id}/"
    assert Order.objects.using("orders").count() == 1
    assert len([m for m in broker.queue if m["task"] == START_SAGA]) == 1
    assert messages_of(client.get(second["Location"]))[-1] == "This order was already placed: here it is."


def test_a_submit_racing_the_first_one_waits_for_it_and_shows_its_order(alice, catalogue, broker, monkeypatch):
    """A double click: the second submit arrives while the first holds the key (the service
    says 409 to an API client). The page waits for the first and answers with its order."""
    client = client_for(alice)
    first = place(client)
    real_place = services.order_place
    calls = []

    def busy_then_done(**kwargs):
        calls.append(kwargs["idempotency_key"])
        if len(calls) < 3:
            raise IdempotencyKeyInFlight("A request with this Idempotency-Key is still being processed")
        return real_place(**kwargs)

    monkeypatch.setattr(services, "order_place", busy_then_done)

    response = client.post("/orders/new/", form_data())

    assert response.status_code == 302
    assert response["Location"] == f"/orders/{first.id}/"
    assert calls == ["key-1"] * 3
    assert Order.objects.using("orders").count() == 1


def test_two_submits_at_the_same_moment_place_one_order(alice, catalogue, broker):
    """Real threads and connections: whichever submit loses the race waits for the winner."""
    barrier = threading.Barrier(4)

    def submit():
        client = client_for(alice)
        barrier.wait()
        try:
            return client.post("/orders/new/", form_data())
        finally:
            connections.close_all()

    with ThreadPoolExecutor(4) as pool:
        responses = list(pool.map(lambda _: submit(), range(4)))

    [order] = Order.objects.using("orders").all()
    assert [r.status_code for r in responses] == [302] * 4
    assert {r["Location"] for r in responses} == {f"/orders/{order.id}/"}


def test_a_submit_still_in_flight_after_the_wait_is_a_form_error(alice, catalogue, broker, monkeypatch):
    monkeypatch.setattr(orders_views, "IN_FLIGHT_WAIT_SECONDS", 0.1)

    def busy(**kwargs):
        raise IdempotencyKeyInFlight("A request with this Idempotency-Key is still being processed")

    monkeypatch.setattr(services, "order_place", busy)

    response = client_for(alice).post("/orders/new/", form_data())

    assert response.status_code == 409
    assert b"still being processed" in response.content
    assert not Order.objects.using("orders").exists()


def test_a_reused_form_with_other_answers_is_refused_with_a_fresh_key(alice, catalogue, broker):
    client = client_for(alice)
    place(client)

    response = client.post("/orders/new/", form_data(**{"qty_SKU-MUG": "3"}))

    assert response.status_code == 422
    assert b"already used to place a different order" in response.content
    fresh = re.search(r'name="idempotency_key" value="([^"]+)"', response.content.decode()).group(1)
    assert fresh != "key-1"
    assert Order.objects.using("orders").count() == 1
    # Submitting the corrected form again places the second order.
    assert place(client, idempotency_key=fresh, **{"qty_SKU-MUG": "3"}).lines.get().quantity == 3


@pytest.mark.parametrize(
    ("overrides", "field", "message"),
    [
        ({"qty_SKU-MUG": "0"}, None, "Choose at least one product"),
        ({"qty_SKU-MUG": "-1"}, "qty_SKU-MUG", "greater than or equal to 0"),
        ({"qty_SKU-MUG": "1001"}, "qty_SKU-MUG", "less than or equal to 1000"),
        ({"qty_SKU-MUG": "two"}, "qty_SKU-MUG", "Enter a whole number"),
        ({"country": "F1"}, "country", "not one of the available choices"),
        ({"country": "Germany"}, "country", "not one of the available choices"),
        ({"phone": "0612"}, "phone", "does not match"),  # the API serializer's rule
        ({"token": "tok_stolen"}, "token", "not one of the available choices"),
        ({"mode": "yolo"}, "mode", "not one of the available choices"),
        ({"city": ""}, "city", "This field is required"),
        ({"idempotency_key": ""}, "idempotency_key", "This field is required"),
    ],
)
def test_form_errors_are_shown_and_nothing_is_placed(alice, catalogue, broker, overrides, field, message):
    response = client_for(alice).post("/orders/new/", form_data(**overrides))

    assert response.status_code == 400
    form = response.context["form"]
    errors = form.non_field_errors() if field is None else form.errors[field]
    assert any(message in error for error in errors), form.errors
    assert b'role="alert"' in response.content
    assert not Order.objects.using("orders").exists()
    assert not broker.queue


def test_a_product_withdrawn_since_the_form_was_shown_is_not_silently_dropped(alice, catalogue, broker):
    Product.objects.using("orders").filter(sku="SKU-MUG").update(is_active=False)

    response = client_for(alice).post("/orders/new/", form_data(**{"qty_SKU-BOOK": "1"}))

    assert response.status_code == 400
    assert "No longer sold, so removed from the form: SKU-MUG." in response.content.decode()
    assert "qty_SKU-MUG" not in response.context["form"].fields
    assert not Order.objects.using("orders").exists()


# --- The order page -----------------------------------------------------------------------------


def test_someone_elses_order_is_not_found(alice, bob, catalogue, broker):
    order = place(client_for(alice))
    bob_client = client_for(bob)

    assert bob_client.get(f"/orders/{order.id}/").status_code == 404
    assert bob_client.post(f"/orders/{order.id}/cancel/").status_code == 404
    assert bob_client.get("/orders/").context["orders"] == []
    broker.deliver()
    assert Order.objects.using("orders").get(id=order.id).status == "shipped"  # bob cancelled nothing


def test_the_order_page_before_the_saga_starts(alice, catalogue, broker):
    client = client_for(alice)
    order = place(client)

    response = client.get(f"/orders/{order.id}/")

    assert response.status_code == 200
    state = response.context["state"]
    assert state["order"] == {"id": str(order.id), "status": "pending", "can_cancel": True, "failure": None}
    assert state["saga"] is None
    html = response.content.decode()
    assert "25.00 EUR" in html
    assert 'id="cancel-form"' in html
    assert "Starting…" in html
    assert f'data-ws-path="/ws/orders/{order.id}/"' in html
    assert 'id="order-state"' in html  # the state order.js starts from


def test_the_order_page_of_a_shipped_order(alice, catalogue, broker):
    client = client_for(alice)
    order = place(client)
    broker.deliver()

    response = client.get(f"/orders/{order.id}/")

    html = response.content.decode()
    assert response.context["state"]["order"]["can_cancel"] is False
    assert re.search(r'<form[^>]*id="cancel-form"[^>]*\shidden>', html)
    assert "Your parcel has left the warehouse, so this order can no longer be cancelled." in html
    assert 'aria-valuenow="8"' in html
    assert 'aria-valuemax="8"' in html
    assert "width: 100%" in html
    labels = [step["label"] for step in response.context["steps"]]
    assert labels[0] == "Reserve the items"
    assert "Parcel leaves the warehouse" in labels
    assert {step["state_label"] for step in response.context["steps"]} == {"done"}


def test_the_order_page_of_a_declined_order_says_why(alice, catalogue, broker):
    client = client_for(alice)
    order = place(client, token="tok_declined")
    broker.deliver()

    response = client.get(f"/orders/{order.id}/")

    state = response.context["state"]
    assert state["order"]["status"] == "rejected"
    assert state["order"]["failure"]["code"] == "card_declined"
    html = response.content.decode()
    assert "This order did not go through." in html
    assert state["order"]["failure"]["message"] in html
    assert "not needed" in html  # the steps it never reached
    assert "reject_order" not in [s["name"] for s in state["saga"]["steps"]]  # action steps only


def test_a_payment_that_never_went_through_is_worded_for_the_customer(alice, alice_api, catalogue, broker):
    """Out of retries: the engine's wording stays with operators; the customer reads what
    happened, and the payment step, compensated without ever having been taken, is not "undone"."""
    response = alice_api.post("/api/orders/", {**order_body(token="tok_flaky_99")}, format="json")
    order = Order.objects.using("orders").get(id=response.json()["id"])
    broker.deliver()
    order.refresh_from_db()
    assert "charge_payment failed after 5 attempt(s)" in order.failure_message  # the engine's words

    page = client_for(alice).get(f"/orders/{order.id}/")

    html = page.content.decode()
    steps = {s["name"]: s["state_label"] for s in page.context["steps"]}
    assert steps["charge_payment"] == "did not go through"
    assert steps["reserve_stock"] == "undone"  # that one did take effect
    assert "We could not take your payment: the payment service did not answer in time." in html
    visible = re.sub(r"<script.*?</script>|<[^>]+>", " ", html, flags=re.S)
    assert "charge_payment" not in visible
    assert "attempt" not in visible
    # The live message carries the same words (order.js renders it as it comes).
    assert page.context["state"]["order"]["failure"]["message"].startswith("We could not take your payment")
    assert {s["name"]: s["shown"] for s in page.context["state"]["saga"]["steps"]}["charge_payment"] == "not_done"


def test_the_page_after_placing_does_not_claim_success_in_advance(alice, catalogue, broker):
    client = client_for(alice)
    order = place(client, token="tok_declined")
    broker.deliver()

    page = client.get(f"/orders/{order.id}/")

    [message] = list(page.context["messages"])
    assert message.level_tag == "info"  # not the green "success"
    assert "placed" not in str(message).lower()


def test_the_list_shows_the_customers_orders_newest_first(alice, bob, catalogue, broker):
    client = client_for(alice)
    older = place(client, idempotency_key="a")
    newer = place(client, idempotency_key="b", **{"qty_SKU-MUG": "1"})
    place(client_for(bob), idempotency_key="c")

    response = client.get("/orders/")

    assert [o.id for o in response.context["orders"]] == [newer.id, older.id]
    html = response.content.decode()
    assert html.index(str(newer.id)[-8:]) < html.index(str(older.id)[-8:])
    assert "12.50 EUR" in html
    assert "Processing" in html


# --- Cancelling without JavaScript --------------------------------------------------------------


def test_cancel_form_in_the_handling_window(alice, catalogue, broker, settings):
    settings.SHIPPING_HANDLING_SECONDS = 3600
    client = client_for(alice)
    order = place(client)
    broker.deliver()
    page = client.get(f"/orders/{order.id}/")
    assert page.context["state"]["order"]["can_cancel"] is True
    assert not re.search(r'id="cancel-form"[^>]*\shidden', page.content.decode())

    response = client.post(f"/orders/{order.id}/cancel/", {"reason": "ordered by mistake"})

    assert response.status_code == 302
    assert response["Location"] == f"/orders/{order.id}/"
    page = client.get(response["Location"])
    assert messages_of(page) == [
        "Cancellation requested. What was done is being undone (stock released, payment refunded); "
        "this page shows when it is complete."
    ]
    saga = Saga.objects.get(id=order.saga_id)
    assert saga.state == "compensating"
    assert saga.failure["by"] == "customer:alice"
    assert saga.failure["message"] == "ordered by mistake"
    broker.deliver()
    page = client.get(f"/orders/{order.id}/")
    assert page.context["state"]["order"]["status"] == "cancelled"
    assert "This order is cancelled." in page.content.decode()
    assert mug() == (50, 0)


def test_cancel_form_refused_once_shipped(alice, catalogue, broker):
    client = client_for(alice)
    order = place(client)
    broker.deliver()

    response = client.post(f"/orders/{order.id}/cancel/", follow=True)

    assert messages_of(response)[-1] == (
        "Not cancelled: your parcel has already left the warehouse, so this order can no longer be cancelled."
    )
    assert b"message--error" in response.content
    assert Order.objects.using("orders").get(id=order.id).status == "shipped"
    assert Saga.objects.get(id=order.saga_id).state == "completed"


def test_cancel_form_refused_when_already_cancelled(alice, catalogue, broker):
    client = client_for(alice)
    order = place(client)
    client.post(f"/orders/{order.id}/cancel/")

    response = client.post(f"/orders/{order.id}/cancel/", follow=True)

    assert messages_of(response)[-1] == "Not cancelled: This order is already cancelled."


def test_cancel_form_needs_the_csrf_token(alice, catalogue, broker):
    order = place(client_for(alice))
    client = Client(enforce_csrf_checks=True)
    client.force_login(alice)

    assert client.post(f"/orders/{order.id}/cancel/").status_code == 403
    assert client.get(f"/orders/{order.id}/cancel/").status_code == 405
    broker.deliver()
    assert Order.objects.using("orders").get(id=order.id).status == "shipped"


# --- Error pages and the favicon ----------------------------------------------------------------


def test_an_unknown_page_is_a_plain_404_in_the_site_style_and_api_paths_stay_json(client, settings):
    settings.DEBUG = False

    page = client.get("/no-such-page/")

    assert page.status_code == 404
    assert page["Content-Type"].startswith("text/html")
    html = page.content.decode()
    assert "<h1>Page not found</h1>" in html
    assert "/static/css/site.css" in html  # the site's own layout, not Django's bare page
    assert 'class="site-header"' in html
    api = client.get("/api/no-such-thing/")
    assert (api.status_code, api.json()["code"]) == (404, "not_found")


def test_a_server_error_is_a_plain_500_in_the_site_style_and_api_paths_stay_json(alice, monkeypatch, settings):
    settings.DEBUG = False

    def broken(**kwargs):
        raise RuntimeError("boom")

    monkeypatch.setattr(orders_views.selectors, "order_list_for_customer", broken)
    client = Client(raise_request_exception=False)
    client.force_login(alice)

    page = client.get("/orders/")

    assert page.status_code == 500
    html = page.content.decode()
    assert "Something went wrong on our side" in html
    assert "/static/css/site.css" in html
    assert "boom" not in html
    assert "Traceback" not in html


def test_every_page_has_a_favicon(client):
    html = client.get("/accounts/login/").content.decode()
    icon = re.search(r'<link rel="icon" href="([^"]+)"', html)[1]
    assert finders.find(icon.removeprefix("/" + settings.STATIC_URL.lstrip("/")))
    response = client.get("/favicon.ico")
    assert (response.status_code, response["Location"]) == (301, icon)
