"""The service registry's and the circuit breakers' pages in a real browser: the dashboard's
queues-and-workers panel lists the registry's instances (service, code version, heartbeat age)
and shows one expiring and one deregistering; the breakers admin page forces a breaker open and
resets it, and fits the screen at desktop and phone widths; a platform node whose breaker is open
says so inside its box.

The instances are rows of the registry's table on `default`, written here as a worker's heartbeat
would. The breakers are forced through the admin page, in the web process that also serves the
dashboard, so these run in the embedded mode too (no Redis shared with this process needed).
Moved into tests/browser/ (whose conftest provides these fixtures) at merge."""

from __future__ import annotations

import itertools
import re
from datetime import timedelta

import pytest
from django.db.models import F
from playwright.sync_api import expect

from sagaplatform.kernel import breakers, registry
from sagaplatform.kernel.clock import db_now
from sagaplatform.kernel.models import ServiceInstance
from tests.browser.conftest import PRODUCTION, SCREENSHOTS, login, screenshot
from tests.conftest import make_operator
from tests.processes import wait_for

pytestmark = [pytest.mark.django_db(transaction=True, databases="__all__")]

BREAKERS = "/admin/orchestration/breakers/"


@pytest.fixture
def ops():
    return make_operator("ops")


@pytest.fixture(autouse=True)
def closed_breakers():
    """In production the breakers live in Redis, shared with the served stack and kept across
    tests: every one closed before and after (embedded, the web process's own; the tests reset
    what they opened through the page)."""
    if PRODUCTION:
        breakers.reset()
    yield
    if PRODUCTION:
        breakers.reset()


def register(worker: str, services: list[str], *, version: str, ttl: float = 120) -> None:
    """What a worker's heartbeat writes (`sagaplatform/workers.py`), for a worker that is not running."""
    registry.backend().heartbeat(
        [
            registry.Instance(
                worker=worker,
                service=service,
                queues=(service,),
                host="ui-host",
                pid=4242,
                code_version=version,
                definitions=("place_order v1",),
            )
            for service in services
        ],
        ttl=ttl,
    )


def no_horizontal_scroll(page) -> None:
    width, client = page.evaluate("[document.documentElement.scrollWidth, document.documentElement.clientWidth]")
    assert width <= client, f"the page is {width} px wide in a {client} px window"


def test_the_instances_panel_lists_the_registry_and_shows_instances_going_away(page, live_stack, ops):
    register("celery@ui-a", ["payments", "shipping"], version="v-ui-1")
    register("celery@ui-b", ["inventory"], version="v-ui-2")
    # Its last heartbeat 150 s ago, still within its TTL: the panel shows the age, not "now".
    now = db_now("default")
    ServiceInstance.objects.using("default").filter(worker="celery@ui-a").update(
        heartbeat_at=now - timedelta(seconds=150), expires_at=now + timedelta(seconds=120)
    )
    login(page, "ops", "ops-pass")
    page.goto("/dashboard/")
    expect(page.locator("#conn")).to_have_attribute("data-state", "live")

    payments = page.locator('#instances li[data-instance="celery@ui-a/payments"]')
    shipping = page.locator('#instances li[data-instance="celery@ui-a/shipping"]')
    inventory = page.locator('#instances li[data-instance="celery@ui-b/inventory"]')
    expect(payments).to_have_class("instance")
    expect(payments.locator(".iservice")).to_have_text("payments")
    expect(payments.locator(".iworker")).to_have_text("celery@ui-a")
    expect(payments.locator(".iages")).to_contain_text("pid 4242 · v-ui-1 · beat 3m ago")
    expect(payments.locator(".wdot")).to_have_attribute("aria-label", "live")
    expect(inventory.locator(".iages")).to_contain_text("v-ui-2 · beat")
    assert "definitions: place_order v1" in payments.get_attribute("title")

    # celery@ui-a stops beating: once past its TTL its instances stay listed, marked expired.
    ServiceInstance.objects.using("default").filter(worker="celery@ui-a").update(
        expires_at=db_now("default") - timedelta(seconds=1)
    )
    expect(payments).to_have_class("instance expired", timeout=10_000)
    expect(payments.locator(".iages")).to_contain_text("expired, last beat 3m ago")
    expect(payments.locator(".wdot")).to_have_attribute("aria-label", "expired")
    expect(shipping).to_have_class("instance expired")
    expect(inventory).to_have_class("instance")  # the other worker is untouched
    # celery@ui-b shuts down cleanly: it deregisters and its row leaves the panel.
    registry.backend().deregister("celery@ui-b")
    expect(inventory).to_have_count(0, timeout=10_000)
    expect(payments).to_have_count(1)
    # Heartbeats age in place (the panel is redrawn from each overview, every 2 s).
    ServiceInstance.objects.using("default").filter(worker="celery@ui-a").update(
        heartbeat_at=F("heartbeat_at") - timedelta(hours=2)
    )
    expect(payments.locator(".iages")).to_contain_text("expired, last beat 2h ago", timeout=10_000)
    assert page.js_errors == []
    screenshot(page, "registry-instances")


def test_the_breakers_page_forces_a_breaker_open_then_resets_it(page, live_stack, ops):
    login(page, "ops", "ops-pass")
    page.set_viewport_size({"width": 1440, "height": 900})
    page.goto(BREAKERS)
    row = page.locator("#breaker-shipping")
    expect(row).to_have_attribute("data-state", "closed")
    no_horizontal_scroll(page)  # eleven columns and the form fit beside the admin's sidebar

    row.get_by_label("Reason").fill("carrier API down")
    row.locator("input[name=seconds]").fill("600")
    row.get_by_role("button", name="Force open").click()
    expect(page.locator(".messagelist")).to_contain_text("The shipping circuit breaker was forced open for 600 s.")
    expect(row).to_have_attribute("data-state", "open")
    expect(row.locator("td.state-open")).to_have_text("open")
    expect(row.locator("td.recent")).to_contain_text("closed → open (user:ops)")
    half_opens_in = float(re.search(r"\(in ([\d.]+) s\)", row.inner_text()).group(1))
    assert 540 < half_opens_in <= 600  # the 600 s asked for, less the time this test took
    expect(page.locator("#breaker-actions")).to_contain_text("forced open for 600 s, was closed: carrier API down")
    expect(page.locator("#breaker-payments")).to_have_attribute("data-state", "closed")
    no_horizontal_scroll(page)
    screenshot(page, "breakers-forced-open")

    # On a phone each breaker is a card of labelled figures with its form below, the page no wider
    # than the screen.
    page.set_viewport_size({"width": 390, "height": 844})
    page.reload()
    no_horizontal_scroll(page)
    expect(page.locator("#breakers thead")).to_be_hidden()
    assert row.locator("td.state-open").evaluate("e => getComputedStyle(e, '::before').content") == '"State: "'
    box, reset = row.bounding_box(), row.get_by_role("button", name="Reset (close)").bounding_box()
    assert box["x"] >= 0
    assert box["x"] + box["width"] <= 390
    assert reset["x"] + reset["width"] <= 390
    screenshot(page, "breakers-phone")

    row.get_by_label("Reason").fill("carrier back")
    row.get_by_role("button", name="Reset (close)").click()
    expect(page.locator(".messagelist")).to_contain_text("The shipping circuit breaker was reset (closed).")
    expect(row).to_have_attribute("data-state", "closed")
    expect(row.locator("td.recent")).to_contain_text("open → closed (user:ops)")
    expect(page.locator("#breaker-actions tbody tr")).to_have_count(2)
    expect(page.locator("#breaker-actions tbody tr").first).to_contain_text("reset (closed), was open: carrier back")


def test_a_platform_node_with_its_breaker_open_says_so_inside_its_box(page, live_stack, ops):
    login(page, "ops", "ops-pass")
    page.goto(BREAKERS)
    row = page.locator("#breaker-payments")
    row.get_by_label("Reason").fill("gateway outage drill")
    row.get_by_role("button", name="Force open").click()
    expect(row).to_have_attribute("data-state", "open")
    try:
        page.goto("/dashboard/")
        expect(page.locator("#conn")).to_have_attribute("data-state", "live")
        node = "window.dashboard.platformCy.$id('payments')"
        wait_for(
            lambda: page.evaluate(f"{node}.data('breaker')") == "open",
            timeout=20,
            message="the payments node to show its breaker open",
        )
        label = page.evaluate(f"{node}.data('label')")
        assert label.split("\n")[0] == "payments"
        assert label.split("\n")[-1] == "breaker open"
        # Only an abnormal breaker takes a line: the closed ones say nothing of it.
        assert page.evaluate("window.dashboard.platformCy.$id('inventory').data('breaker')") == "closed"
        assert "breaker" not in page.evaluate("window.dashboard.platformCy.$id('inventory').data('label')")
        # The label's lines fit inside the box (it grew with them), and no two boxes touch.
        page.wait_for_timeout(100)  # one frame: the fit after the update
        boxes = page.evaluate(
            """() => window.dashboard.platformCy.nodes().map((n) => ({
                 id: n.id(),
                 body: n.boundingBox({ includeLabels: false, includeOverlays: false }),
                 label: n.boundingBox({ includeNodes: false, includeLabels: true, includeOverlays: false }),
               }))"""
        )
        by_id = {b["id"]: b for b in boxes}
        body, text = by_id["payments"]["body"], by_id["payments"]["label"]
        assert body["y1"] <= text["y1"], (body, text)
        assert text["y2"] <= body["y2"], (body, text)
        assert body["x1"] <= text["x1"], (body, text)
        assert text["x2"] <= body["x2"], (body, text)
        hub = by_id["orchestrator"]
        assert hub["label"]["x1"] >= hub["body"]["x1"], hub
        assert hub["label"]["x2"] <= hub["body"]["x2"], hub
        column = sorted((b["body"] for i, b in by_id.items() if i != "orchestrator"), key=lambda b: b["y1"])
        for upper, lower in itertools.pairwise(column):
            assert upper["y2"] < lower["y1"], (upper, lower)
        # At this width (two columns, the platform row below) the saga list does not follow the
        # scroll down over the platform row.
        page.locator("#flow-block").scroll_into_view_if_needed()
        listed, flow = (page.locator(sel).bounding_box() for sel in (".list-panel", "#flow-block"))
        assert listed["y"] + listed["height"] <= flow["y"], (listed, flow)
        assert page.js_errors == []
        screenshot(page, "platform-breaker-open")
        page.locator("#flow-block").screenshot(path=str(SCREENSHOTS / "platform-breaker-open-graph.png"))
    finally:
        page.goto(BREAKERS)
        row.get_by_label("Reason").fill("drill over")
        row.get_by_role("button", name="Reset (close)").click()
        expect(row).to_have_attribute("data-state", "closed")
