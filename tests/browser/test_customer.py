"""A customer in a real browser: log in, place an order through the form, watch its steps complete
live on its page, place another and cancel it in the handling window.

Headless Chromium against the platform served by real processes (see conftest.py). Screenshots
of every stage land in test-artifacts/screenshots/customer-*.png.
"""

from __future__ import annotations

import re
import time

import pytest

from orders.models import Order
from tests.browser.conftest import expect, login, screenshot
from tests.conftest import ADDRESS

pytestmark = pytest.mark.django_db(transaction=True, databases="__all__")

# A full saga includes the handling window (conftest: 4 s) and, on a busy machine, a few
# seconds of queueing: generous, as a person watching the page would be.
SAGA_TIMEOUT_MS = 60_000


def place_order(page, *, quantity: int = 2, token: str = "tok_visa") -> str:
    page.goto("/orders/new/")
    page.get_by_label("Quantity of Sku-Mug").fill(str(quantity))
    page.get_by_label("Card").select_option(token)
    page.get_by_label("Full name").fill(ADDRESS["name"])
    page.get_by_label("Address", exact=True).fill(ADDRESS["line1"])
    page.get_by_label("City").fill(ADDRESS["city"])
    page.get_by_label("Postal code").fill(ADDRESS["postal_code"])
    page.get_by_label("Country").select_option(ADDRESS["country"])
    page.get_by_role("button", name="Place order").click()
    page.wait_for_url(re.compile(r"/orders/[0-9a-f-]{36}/$"))
    return page.url.rstrip("/").rsplit("/", 1)[1]


def test_customer_places_watches_and_cancels_orders(page, live_stack, catalogue, alice):
    page.goto("/orders/")
    expect(page).to_have_url(re.compile(r"/accounts/login/\?next=/orders/$"))
    screenshot(page, "customer-00-login")
    login(page, "alice", "alice-pass")
    expect(page.get_by_text("Signed in as alice")).to_be_visible()
    screenshot(page, "customer-01-orders-empty")

    page.goto("/orders/new/")
    expect(page.get_by_role("heading", name="Place an order")).to_be_visible()
    screenshot(page, "customer-02-order-form")

    # The form refuses a submission without any product, and says so.
    page.get_by_role("button", name="Place order").click()
    expect(page.get_by_role("alert")).to_contain_text("Choose at least one product")
    screenshot(page, "customer-03-form-errors")

    # Place an order, then watch it from its page: nothing reloads the page (a marker set on the
    # window object would be gone after a reload).
    first = place_order(page)
    expect(page.locator("#messages")).to_contain_text("We have received your order")
    page.evaluate("window.__noReload = true")
    expect(page.locator("#live-indicator")).to_have_attribute("data-live", "on", timeout=15_000)
    screenshot(page, "customer-04-order-in-progress")

    # The handling window: approved, cancellable, the dispatch waiting.
    expect(page.locator("#order-status")).to_have_attribute("data-status", "approved", timeout=SAGA_TIMEOUT_MS)
    expect(page.locator("#cancel-button")).to_be_visible()
    screenshot(page, "customer-05-order-approved")

    # Shipped: the bar is full, every step done, and the cancel button gone with a clear reason.
    expect(page.locator("#order-status")).to_have_attribute("data-status", "shipped", timeout=SAGA_TIMEOUT_MS)
    expect(page.locator("#order-status")).to_have_text("Shipped")
    progress = page.get_by_role("progressbar")
    expect(progress).to_have_attribute("aria-valuenow", "8", timeout=SAGA_TIMEOUT_MS)
    expect(progress).to_have_attribute("aria-valuemax", "8")
    expect(page.locator(".step")).to_have_count(8)
    expect(page.locator('.step[data-state="succeeded"]')).to_have_count(8)
    expect(page.locator("#progress .progress__bar")).to_have_attribute("style", "width: 100%;")
    expect(page.locator("#cancel-form")).to_be_hidden()
    expect(page.locator("#order-note")).to_contain_text("can no longer be cancelled")
    page.wait_for_timeout(600)  # the bar's width transition, for the screenshot
    assert page.evaluate("window.__noReload") is True, "the page reloaded instead of updating live"
    assert page.js_errors == []
    screenshot(page, "customer-06-order-shipped")
    page.set_viewport_size({"width": 390, "height": 844})
    screenshot(page, "customer-06b-order-shipped-phone")
    page.set_viewport_size({"width": 1200, "height": 900})
    assert Order.objects.using("orders").get(id=first).status == "shipped"

    # A second order, cancelled in the handling window with the button (fetch to the REST API).
    second = place_order(page, quantity=1)
    page.evaluate("window.__noReload = true")
    expect(page.locator("#order-status")).to_have_attribute("data-status", "approved", timeout=SAGA_TIMEOUT_MS)
    page.get_by_role("button", name="Cancel order").click()
    expect(page.locator("#messages")).to_contain_text("Cancellation requested")
    screenshot(page, "customer-07-cancel-requested")
    expect(page.locator("#order-status")).to_have_attribute("data-status", "cancelled", timeout=SAGA_TIMEOUT_MS)
    expect(page.locator("#order-note")).to_contain_text("This order is cancelled")
    expect(page.locator("#cancel-form")).to_be_hidden()
    expect(page.locator('.step[data-step="dispatch_shipment"]')).to_contain_text("not needed")
    expect(page.locator('.step[data-step="reserve_stock"]')).to_have_attribute("data-state", "compensated")
    assert page.evaluate("window.__noReload") is True
    screenshot(page, "customer-08-order-cancelled")
    assert Order.objects.using("orders").get(id=second).status == "cancelled"

    # The list shows both, newest first.
    page.goto("/orders/")
    rows = page.locator("tbody tr")
    expect(rows).to_have_count(2)
    expect(rows.nth(0)).to_contain_text("Cancelled")
    expect(rows.nth(1)).to_contain_text("Shipped")
    screenshot(page, "customer-09-orders-list")

    # The shipped order's page, opened afresh: no cancel button, and the reason shown.
    page.goto(f"/orders/{first}/")
    expect(page.locator("#cancel-form")).to_be_hidden()
    expect(page.locator("#order-note")).to_have_text(
        "Your parcel has left the warehouse, so this order can no longer be cancelled."
    )


def test_without_javascript_a_stale_cancel_is_refused_with_a_clear_message(
    browser, live_stack, settle_after, catalogue, alice
):
    """The page without JavaScript, left open on an approved order: by the time the customer
    presses Cancel the parcel has left. The plain form's POST is refused (already shipped) and
    the page says why, with no cancel button any more."""
    context = browser.new_context(base_url=live_stack.url, java_script_enabled=False)
    page = context.new_page()
    try:
        login(page, "alice", "alice-pass")
        order_id = place_order(page)

        def status() -> str:
            return Order.objects.using("orders").get(id=order_id).status

        deadline = time.monotonic() + SAGA_TIMEOUT_MS / 1000
        while status() != "approved":
            assert time.monotonic() < deadline, "the order was not approved"
            time.sleep(0.2)
        page.reload()
        expect(page.locator("#order-status")).to_have_text("Approved")
        expect(page.locator("#live-indicator")).to_contain_text("off")
        screenshot(page, "customer-10-nojs-approved")
        while status() != "shipped":
            assert time.monotonic() < deadline, "the order did not ship"
            time.sleep(0.2)

        page.get_by_role("button", name="Cancel order").click()  # a plain form POST

        expect(page.locator("#messages")).to_contain_text("Not cancelled: your parcel has already left the warehouse")
        expect(page.locator("#order-status")).to_have_text("Shipped")
        expect(page.get_by_role("button", name="Cancel order")).to_have_count(0)
        screenshot(page, "customer-11-nojs-cancel-refused")
    finally:
        context.close()


def test_the_page_reconnects_after_losing_its_websocket_and_reads_the_state_again(page, live_stack, catalogue, alice):
    """The first websocket connection drops at once (as a restarting server or a network blip
    would drop it); the page says so, reads the order again, reconnects, and stays live."""
    connections: list[str] = []

    def handle(ws):
        connections.append(ws.url)
        if len(connections) == 1:
            ws.close(code=1012, reason="service restart")
            return
        ws.connect_to_server()  # later connections go through to the server as they are

    page.route_web_socket(re.compile(r"/ws/orders/"), handle)
    rereads: list[str] = []
    page.on("request", lambda r: rereads.append(r.url) if r.resource_type == "fetch" and "/orders/" in r.url else None)
    login(page, "alice", "alice-pass")

    order_id = place_order(page)

    expect(page.locator("#live-indicator")).to_have_attribute("data-live", "on", timeout=15_000)
    assert len(connections) >= 2
    assert any(url.endswith(f"/orders/{order_id}/") for url in rereads), rereads
    # Live after the reconnection: the order moves on without a reload.
    page.evaluate("window.__noReload = true")
    expect(page.locator("#order-status")).to_have_attribute("data-status", "shipped", timeout=SAGA_TIMEOUT_MS)
    assert page.evaluate("window.__noReload") is True
    assert page.js_errors == []
