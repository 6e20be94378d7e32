"""The pages as a person sees them, on a 1400 px desktop and a 390 px phone: nothing clipped or
wider than the screen, the dashboard stacked on a phone, the transaction-flow graph legible, the
saga graph's labels in step with the timeline, and the order form safe from Back + submit.

Measured in headless Chromium (tests/browser/conftest.py); screenshots of each page at each
width land in test-artifacts/screenshots/layout-*.png (look at them).
"""

from __future__ import annotations

import re

import pytest

from orders.models import Order, Product
from sagaplatform.demo import CATALOGUE as DEMO_CATALOGUE
from tests.browser.conftest import expect, login, screenshot
from tests.browser.test_dashboard import SAGA_TIMEOUT_MS, open_dashboard, place_order, select_in_list, wait_node
from tests.conftest import ADDRESS, make_operator, order_body

pytestmark = pytest.mark.django_db(transaction=True, databases="__all__")

DESKTOP = {"width": 1400, "height": 900}
PHONE = {"width": 390, "height": 844}
LEGIBLE_PX = 11  # the smallest rendered label size that reads comfortably

# Every element wider than the page's own width, and the page's width (0 overflow on a phone).
PAGE_WIDTH = "() => document.documentElement.scrollWidth"
# Cells whose text does not fit in what is shown of them (a table cut by its scrolling wrapper
# counts: "Subtota", "56.50 EUI").
CLIPPED_CELLS = """sel => {
  const out = [];
  for (const wrap of document.querySelectorAll(sel)) {
    const box = wrap.getBoundingClientRect();
    for (const cell of wrap.querySelectorAll("th, td")) {
      const r = cell.getBoundingClientRect();
      if (r.width && (r.right > box.right + 0.5 || r.left < box.left - 0.5 || cell.scrollWidth > cell.clientWidth + 1))
        out.push(cell.textContent.trim());
    }
  }
  return out;
}"""
BOX = "sel => { const r = document.querySelector(sel).getBoundingClientRect(); return {x: r.x, y: r.y, w: r.width, h: r.height}; }"


@pytest.fixture
def ops():
    return make_operator("ops")


def resize(page, viewport: dict) -> None:
    page.set_viewport_size(viewport)
    page.wait_for_timeout(300)  # ResizeObserver and the graphs' refit run on the next frames


def test_the_order_page_shows_every_item_in_full_on_a_desktop_and_a_phone(page, live_stack, catalogue, alice):
    for sku, name, _price, _stock in DEMO_CATALOGUE:  # the demo's names, long ones included
        Product.objects.using("orders").filter(sku=sku).update(name=name)
    items = [{"sku": "SKU-MUG", "quantity": 2}, {"sku": "SKU-BOOK", "quantity": 3}, {"sku": "SKU-LAMP", "quantity": 1}]
    api = page.request.post(
        "/api/orders/",
        data={**order_body(items=items)},
        headers={"Authorization": "Basic YWxpY2U6YWxpY2UtcGFzcw=="},  # alice:alice-pass
    )
    assert api.status == 202, api.text()
    login(page, "alice", "alice-pass")
    for name, viewport in (("desktop", DESKTOP), ("phone", PHONE)):
        resize(page, viewport)
        page.goto(api.json()["url"].replace("/api/orders/", "/orders/"))
        expect(page.locator("#order-total")).to_be_visible()
        screenshot(page, f"layout-order-{name}")
        assert page.evaluate(PAGE_WIDTH) <= viewport["width"], name
        assert page.evaluate(CLIPPED_CELLS, "section[aria-labelledby=lines-heading] .table-wrap") == [], name
        assert "EUR" in page.locator("#order-total").inner_text()


def test_back_then_submit_again_in_a_browser_shows_the_order_already_placed(page, live_stack, catalogue, alice):
    login(page, "alice", "alice-pass")
    page.goto("/orders/new/")
    page.get_by_label("Quantity of Sku-Mug").fill("1")
    page.get_by_label("Full name").fill(ADDRESS["name"])
    page.get_by_label("Address", exact=True).fill(ADDRESS["line1"])
    page.get_by_label("City").fill(ADDRESS["city"])
    page.get_by_label("Postal code").fill(ADDRESS["postal_code"])
    page.get_by_label("Country").select_option(ADDRESS["country"])
    page.get_by_role("button", name="Place order").click()
    page.wait_for_url(re.compile(r"/orders/[0-9a-f-]{36}/$"))
    first = page.url

    page.go_back()
    expect(page.get_by_role("heading", name="Place an order")).to_be_visible()
    # Whatever the browser restored, the customer sees the same answers and submits them again.
    page.get_by_label("Quantity of Sku-Mug").fill("1")
    page.get_by_label("Full name").fill(ADDRESS["name"])
    page.get_by_label("Address", exact=True).fill(ADDRESS["line1"])
    page.get_by_label("City").fill(ADDRESS["city"])
    page.get_by_label("Postal code").fill(ADDRESS["postal_code"])
    page.get_by_label("Country").select_option(ADDRESS["country"])
    screenshot(page, "layout-order-form-after-back")
    page.get_by_role("button", name="Place order").click()
    page.wait_for_url(re.compile(r"/orders/[0-9a-f-]{36}/$"))

    assert page.url == first
    expect(page.locator("#messages")).to_contain_text("This order was already placed")
    assert Order.objects.using("orders").count() == 1


def test_the_dashboard_stacks_on_a_phone_and_keeps_three_columns_on_a_desktop(page, live_stack, catalogue, alice, ops):
    saga_id = place_order(live_stack)["saga"]["id"]
    open_dashboard(page)
    select_in_list(page, saga_id)
    wait_node(page, "reserve_stock", "succeeded")  # the graph drawn, its first step settled

    resize(page, DESKTOP)
    screenshot(page, "layout-dashboard-desktop")
    assert page.evaluate(PAGE_WIDTH) <= DESKTOP["width"]
    desktop = {sel: page.evaluate(BOX, sel) for sel in (".list-panel", "#saga-panel", ".platform-panel")}
    assert desktop[".list-panel"]["x"] < desktop["#saga-panel"]["x"] < desktop[".platform-panel"]["x"]
    assert desktop["#saga-panel"]["w"] >= 520

    resize(page, PHONE)
    page.locator("#saga-panel").scroll_into_view_if_needed()
    screenshot(page, "layout-dashboard-phone")
    assert page.evaluate(PAGE_WIDTH) <= PHONE["width"]
    boxes = {
        sel: page.evaluate(BOX, sel) for sel in (".list-panel", "#saga-graph", "#timeline-wrap", ".platform-panel")
    }
    for sel, box in boxes.items():  # each takes the full width, less the page's margins
        assert box["w"] >= PHONE["width"] - 60, (sel, box)
        assert box["x"] >= 0, (sel, box)
        assert box["x"] + box["w"] <= PHONE["width"], (sel, box)
    # Stacked, in reading order: the list, then the graph, then the timeline.
    assert boxes[".list-panel"]["y"] < boxes["#saga-graph"]["y"] < boxes["#timeline-wrap"]["y"]
    assert boxes["#saga-graph"]["h"] >= 300
    # The whole graph is drawn in view; the operator may pinch to zoom into it, and a tapped step's
    # details show under the graph at full size (not in a card over a third of it).
    graph = page.evaluate(
        """() => { const cy = window.dashboard.cy, ext = cy.extent();
          return {zoom: cy.zoom(), zooming: cy.userZoomingEnabled(), inside: cy.nodes().every(n => {
            const b = n.boundingBox(); return b.x1 >= ext.x1 - 1 && b.x2 <= ext.x2 + 1 && b.y1 >= ext.y1 - 1 && b.y2 <= ext.y2 + 1; })}; }"""
    )
    assert graph["inside"], graph
    assert graph["zooming"], graph
    page.evaluate("() => window.dashboard.cy.$id('charge_payment').emit('tap')")
    card = page.evaluate(BOX, "#step-card")
    assert card["y"] >= boxes["#saga-graph"]["y"] + boxes["#saga-graph"]["h"] - 1, card
    assert card["w"] >= PHONE["width"] - 80, card
    expect(page.locator("#step-card")).to_contain_text("charge_payment")
    screenshot(page, "layout-dashboard-phone-step")


def test_the_transaction_flow_is_legible_expanded(page, live_stack, catalogue, alice, ops):
    place_order(live_stack)
    open_dashboard(page)
    resize(page, DESKTOP)
    page.wait_for_function("() => window.dashboard.platformCy.nodes().length >= 6", timeout=SAGA_TIMEOUT_MS)
    screenshot(page, "layout-flow-panel")
    page.get_by_role("button", name="Expand the transaction flow").click()
    page.wait_for_timeout(400)
    screenshot(page, "layout-flow-expanded")
    flow = page.evaluate(
        """() => { const cy = window.dashboard.platformCy, ext = cy.extent(), nodes = cy.nodes();
          const boxes = nodes.map(n => n.boundingBox({includeLabels: true}));
          let overlaps = 0;
          boxes.forEach((a, i) => boxes.slice(i + 1).forEach(b => {
            if (a.x1 < b.x2 && b.x1 < a.x2 && a.y1 < b.y2 && b.y1 < a.y2) overlaps++; }));
          return {zoom: cy.zoom(), overlaps,
            font: Math.min(...nodes.map(n => parseFloat(n.style('font-size')))),
            inside: boxes.every(b => b.x1 >= ext.x1 - 1 && b.x2 <= ext.x2 + 1 && b.y1 >= ext.y1 - 1 && b.y2 <= ext.y2 + 1),
            labels: nodes.map(n => n.data('label'))}; }"""
    )
    assert flow["font"] * flow["zoom"] >= LEGIBLE_PX, flow
    assert flow["overlaps"] == 0, flow
    assert flow["inside"], flow
    assert all("msg/min" in label for label in flow["labels"]), flow
    page.keyboard.press("Escape")
    expect(page.get_by_role("button", name="Expand the transaction flow")).to_be_visible()


def test_the_graph_labels_count_attempts_as_the_timeline_does(page, live_stack, ops):
    """A step retrying after its 4th try failed has attempts=5 (the try under way or waited for);
    the timeline says "attempt 4" failed, so must the node."""
    open_dashboard(page)
    labels = page.evaluate(
        """async () => {
          const {statusLine} = await import('/static/dashboard/sagagraph.js');
          const soon = new Date(Date.now() + 30000).toISOString();
          return [
            statusLine({state: 'retrying', attempts: 5, next_attempt_at: soon}),
            statusLine({state: 'retrying', attempts: 5, next_attempt_at: null}),
            statusLine({state: 'compensating', attempts: 1, compensation_attempts: 3, next_attempt_at: soon}),
            statusLine({state: 'confirming', attempts: 1, confirm_attempts: 2, next_attempt_at: soon}),
            statusLine({state: 'compensated', attempts: 5, compensation_attempts: 1, acted: false}),
          ];
        }"""
    )
    assert labels[0].startswith("RETRYING · try 4 failed · try 5 in "), labels
    assert labels[1] == "RETRYING · try 4 failed · try 5 under way", labels
    assert labels[2].startswith("COMPENSATING · undo try 2 failed · try 3 in "), labels
    assert labels[3].startswith("CONFIRMING · try 1 failed · try 2 in "), labels
    assert labels[4] == "COMPENSATED · 5 tries · nothing to undo", labels
