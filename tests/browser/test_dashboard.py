"""An operator in a real browser on the live dashboard: orders placed through the API appear and
complete on screen, an injected failure is drawn as the compensations that ran, and a parked saga
is retried from the screen (with its confirmation dialog) and finishes compensating.

Headless Chromium against the platform served by real processes (tests/browser/conftest.py).
The graph is read through `window.dashboard.cy` (the Cytoscape instance the page draws), the list
and the timeline through their DOM. Screenshots of every stage land in
test-artifacts/screenshots/dashboard-*.png.
"""

from __future__ import annotations

import base64
import json
import re
import time
import urllib.error
import urllib.request

import pytest
from playwright.sync_api import expect

from orchestration.models import Saga, SagaEvent
from sagaplatform.kernel import faults
from tests.browser.conftest import login, screenshot
from tests.conftest import make_operator, order_body
from tests.processes import wait_for

pytestmark = pytest.mark.django_db(transaction=True, databases="__all__")

# The handling window (conftest: 4 s) plus, on a busy machine, a few seconds of queueing.
SAGA_TIMEOUT_MS = 60_000
ACTION_STEPS = (
    "reserve_stock",
    "charge_payment",
    "approve_order",
    "schedule_shipment",
    "dispatch_shipment",
    "commit_stock",
    "mark_shipped",
    "notify_customer",
)

# Every batch the page applies, recorded before its scripts run: proves updates arrived live
# through the feed (a reload or a poll would not call it).
FEED_RECORDER = """
window.__feed = [];
window.__onFeedApplied = (headers, paintedAt) => {
  for (const h of headers) window.__feed.push({id: h.id, state: h.state, version: h.version, paintedAt});
};
"""


@pytest.fixture
def ops():
    """The operator at the screen: staff, may operate sagas."""
    return make_operator("ops")


@pytest.fixture
def root(django_user_model):
    """Who breaks things on purpose (fault rules need their own permissions) and hurries them."""
    return django_user_model.objects.create_superuser("root", "root@example.com", "root-pass")


def api(live_stack, method: str, path: str, body: dict | None = None, *, user: str, password: str):
    """The REST API as a script would call it (HTTP Basic, no browser session)."""
    request = urllib.request.Request(
        live_stack.url + path,
        method=method,
        data=json.dumps(body).encode() if body is not None else None,
        headers={
            "Content-Type": "application/json",
            "Authorization": "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode(),
        },
    )
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            raw = response.read()
            return response.status, json.loads(raw) if raw else None
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read() or b"null")


def place_order(live_stack, *, token: str = "tok_visa") -> dict:
    status, receipt = api(
        live_stack, "POST", "/api/orders/", order_body(token=token), user="alice", password="alice-pass"
    )
    assert status == 202, receipt
    return receipt


def inject_fault(live_stack, **rule) -> dict:
    status, created = api(live_stack, "POST", "/api/faults/", rule, user="root", password="root-pass")
    assert status == 201, created
    time.sleep(faults.CACHE_SECONDS + 0.2)  # the worker reads its rules at most once a second
    return created


def open_dashboard(page) -> None:
    page.add_init_script(FEED_RECORDER)
    login(page, "ops", "ops-pass")
    page.goto("/dashboard/")
    expect(page.locator("#conn")).to_have_attribute("data-state", "live")
    page.evaluate("window.__noReload = true")


def node_state(page, step: str) -> str | None:
    return page.evaluate("s => window.dashboard.cy.$id(s).data('state') ?? null", step)


def wait_node(page, step: str, state: str, *, timeout: int = SAGA_TIMEOUT_MS) -> None:
    try:
        page.wait_for_function(
            "([s, st]) => window.dashboard?.cy.$id(s).data('state') === st", arg=[step, state], timeout=timeout
        )
    except Exception:
        path = screenshot(page, f"dashboard-failed-waiting-for-{step}-{state}")
        shown = node_state(page, step)
        raise AssertionError(f"{step} never showed {state} (it shows {shown}); see {path}") from None


def edge_class(page, edge_id: str) -> str:
    return page.evaluate("id => window.dashboard.cy.$id(id).classes().join(' ')", edge_id)


def select_in_list(page, saga_id: str) -> None:
    row = page.locator(f"#saga-{saga_id}")
    expect(row).to_be_visible(timeout=15_000)
    row.click()
    expect(row).to_have_attribute("aria-selected", "true")
    expect(page.locator("#saga-id")).to_have_text(saga_id)


def park_on_a_failing_release(page, live_stack) -> tuple[str, dict]:
    """A declined card whose stock release keeps failing: the saga parks. Each backoff is given
    its next attempt at once (the operator API's retry of a stuck saga), so the compensation
    policy (10 attempts) runs out in seconds rather than minutes."""
    rule = inject_fault(live_stack, service="inventory", operation="release", failure_rate=1.0)
    saga_id = place_order(live_stack, token="tok_declined")["saga"]["id"]

    def parked() -> bool:
        state = Saga.objects.filter(id=saga_id).values_list("state", flat=True).first()  # None: not started yet
        if state == "parked":
            return True
        if state is not None:
            api(
                live_stack,
                "POST",
                f"/api/sagas/{saga_id}/retry/",
                {"reason": "hurry"},
                user="root",
                password="root-pass",
            )
        return False

    wait_for(parked, timeout=90, interval=0.3, message="the saga to park")
    return saga_id, rule


def test_an_order_placed_through_the_api_turns_completed_on_screen(page, live_stack, catalogue, alice, ops):
    open_dashboard(page)
    screenshot(page, "dashboard-01-opened")

    saga_id = place_order(live_stack)["saga"]["id"]
    select_in_list(page, saga_id)
    # The graph is the definition's: 8 steps, the dispatch marked as the pivot, the failure
    # path in its own box.
    assert page.evaluate("window.dashboard.cy.nodes('.step.main').length") == len(ACTION_STEPS)
    assert page.evaluate("window.dashboard.cy.$id('dispatch_shipment').hasClass('pivot')") is True
    assert page.evaluate("window.dashboard.cy.$id('reject_order').data('parent')") == "group:on_failure"

    # The handling window: every step before the pivot succeeded, the dispatch waits. A cancel
    # now would undo those four steps, and the graph says so with dotted edges back along them.
    wait_node(page, "schedule_shipment", "succeeded")
    if node_state(page, "dispatch_shipment") == "pending":
        would = page.evaluate("window.dashboard.cy.edges('.comp-would').map(e => e.target().id()).sort()")
        assert would == sorted(["reserve_stock", "charge_payment", "approve_order", "schedule_shipment"])
        expect(page.locator("#act-cancel")).to_be_enabled()
        screenshot(page, "dashboard-02-handling-window")

    started = time.monotonic()
    for step in ACTION_STEPS:
        wait_node(page, step, "succeeded")
    expect(page.locator("#saga-state")).to_have_text("completed")
    # After the pivot nothing can be undone: no compensation edge is drawn, cancel is off.
    assert page.evaluate("window.dashboard.cy.edges('.comp').filter(e => !e.hasClass('comp-none')).length") == 0
    expect(page.locator("#act-cancel")).to_be_disabled()
    expect(page.locator(f"#saga-{saga_id}")).to_contain_text("completed")
    expect(page.locator('#timeline tr[data-kind="saga_completed"]')).to_have_count(1)
    assert time.monotonic() - started < 30, "the last steps took more than seconds to show"

    feed = page.evaluate("window.__feed")
    seen = [f["state"] for f in feed if f["id"] == saga_id]
    assert "completed" in seen, f"the completion did not arrive through the live feed: {seen}"
    assert page.evaluate("window.__noReload") is True, "the page reloaded instead of updating live"
    assert page.js_errors == []
    screenshot(page, "dashboard-03-completed")


def test_an_injected_failure_is_drawn_as_the_compensations_that_ran(page, live_stack, catalogue, alice, ops, root):
    open_dashboard(page)
    # Shipping refuses every booking (a transient error, so it is retried until the policy runs
    # out); then everything before it is undone, in reverse order.
    inject_fault(live_stack, service="shipping", operation="schedule", fail_first=99)
    saga_id = place_order(live_stack)["saga"]["id"]

    # Found by searching its id, as an operator pasting it from a ticket would.
    page.get_by_placeholder("Search a saga or order id…").fill(saga_id[:13])
    expect(page.locator(".saga-row")).to_have_count(1, timeout=15_000)
    page.get_by_placeholder("Search a saga or order id…").press("Enter")
    expect(page.locator("#saga-id")).to_have_text(saga_id)

    page.wait_for_function(
        "() => (window.dashboard.cy.$id('schedule_shipment').data('attempts') || 0) >= 2", timeout=SAGA_TIMEOUT_MS
    )
    screenshot(page, "dashboard-04-retrying")

    # Out of attempts, the step itself is undone too (its last attempt may have committed
    # somewhere), then everything before it, in reverse order.
    for step in ("schedule_shipment", "approve_order", "charge_payment", "reserve_stock"):
        wait_node(page, step, "compensated")
    for step in ("reject_order", "notify_failure"):
        wait_node(page, step, "succeeded")
    expect(page.locator("#saga-state")).to_have_text("compensated")
    assert page.evaluate("window.dashboard.cy.$id('schedule_shipment').data('attempts')") == 5
    # One dashed edge back along the path for each compensation that ran, labelled with it.
    for source, target, compensation in (
        ("dispatch_shipment", "schedule_shipment", "cancel"),
        ("schedule_shipment", "approve_order", "revoke"),
        ("approve_order", "charge_payment", "refund"),
        ("charge_payment", "reserve_stock", "release"),
    ):
        edge = f"c:{source}>{target}"
        assert "comp-ran" in edge_class(page, edge)
        assert page.evaluate("id => window.dashboard.cy.$id(id).data('compLabel')", edge) == f"↶ {compensation}"
    assert page.evaluate("window.dashboard.cy.edges('.comp-would').length") == 0  # nothing left to undo
    expect(page.locator("#saga-failure")).to_contain_text("retries_exhausted")
    expect(page.locator('#timeline tr[data-kind="step_failed"]')).to_have_count(1)
    expect(page.locator('#timeline tr[data-kind="retry_scheduled"]').first).to_contain_text("injected_fault")

    # The filters agree: it is under "Compensated", not under "Completed".
    page.get_by_placeholder("Search a saga or order id…").fill("")
    page.locator('.chip[data-filter="compensated"]').click()
    expect(page.locator(f"#saga-{saga_id}")).to_be_visible()
    page.locator('.chip[data-filter="completed"]').click()
    expect(page.locator(f"#saga-{saga_id}")).to_have_count(0)
    page.locator('.chip[data-filter="all"]').click()
    assert page.js_errors == []
    screenshot(page, "dashboard-05-compensated")


def test_a_parked_saga_is_retried_from_the_screen(page, live_stack, catalogue, alice, ops, root):
    open_dashboard(page)
    # The card is declined, so the stock must be released; the release keeps failing.
    saga_id, rule = park_on_a_failing_release(page, live_stack)
    select_in_list(page, saga_id)
    wait_node(page, "reserve_stock", "compensation_failed")
    expect(page.locator("#saga-state")).to_have_text("parked")
    assert "comp-failed" in edge_class(page, "c:charge_payment>reserve_stock")
    # The tile counts it, and takes the operator to it.
    expect(page.locator("#kpi-attention [data-field='value']")).to_have_text("1")
    page.locator("#kpi-attention").click()
    expect(page.locator(".saga-row")).to_have_count(1)
    expect(page.locator(f"#saga-{saga_id}")).to_contain_text("parked")
    expect(page.locator("#act-retry")).to_be_enabled()
    expect(page.locator("#act-skip")).to_be_enabled()
    expect(page.locator("#act-cancel")).to_be_disabled()
    screenshot(page, "dashboard-06-parked")

    # The cause is fixed (the fault removed); the operator retries from the screen. Nothing is
    # sent before the confirmation.
    status, _ = api(live_stack, "DELETE", f"/api/faults/inventory/{rule['id']}/", user="root", password="root-pass")
    assert status == 204
    # Workers keep the fault rules they read for faults.CACHE_SECONDS: a retry sooner may still
    # meet the deleted rule in the worker (it did, 24 ms after the click, once hops got cheaper).
    time.sleep(faults.CACHE_SECONDS)
    page.locator("#act-retry").click()
    dialog = page.get_by_role("dialog")
    expect(dialog).to_be_visible()
    expect(dialog).to_contain_text("Retry this saga?")
    dialog.get_by_role("button", name="Back").click()
    expect(dialog).to_be_hidden()
    assert Saga.objects.get(id=saga_id).state == "parked"

    page.locator("#act-retry").click()
    dialog.get_by_label(re.compile("Reason")).fill("inventory release fixed, ticket 7")
    screenshot(page, "dashboard-07-confirm-retry")
    dialog.get_by_role("button", name="Retry now").click()

    wait_node(page, "reserve_stock", "compensated")
    expect(page.locator("#saga-state")).to_have_text("compensated")
    assert "comp-ran" in edge_class(page, "c:charge_payment>reserve_stock")
    retry_row = page.locator('#timeline tr[data-kind="operator_retry"]').last
    expect(retry_row).to_contain_text("inventory release fixed, ticket 7")
    expect(retry_row).to_contain_text("ops")
    expect(page.locator("#kpi-attention [data-field='value']")).to_have_text("0")
    # The answer to the action was shown (toasts fade; the page keeps a log of them).
    page.wait_for_function("() => window.dashboard.state.toasts.some(t => t.title === 'Retry accepted')")

    # Audited in the database: who and why.
    retry = SagaEvent.objects.filter(saga_id=saga_id, kind="operator_retry").order_by("-seq").first()
    assert retry.data["reason"] == "inventory release fixed, ticket 7"
    assert "ops" in retry.actor
    assert Saga.objects.get(id=saga_id).state == "compensated"
    assert page.js_errors == []
    screenshot(page, "dashboard-08-retried")


def timeline_has_all_events(page, saga_id: str, count: int) -> None:
    """The timeline shows `count` rows; if not, say what the page holds (it heals a gap by itself
    within FEED_RECONCILE_SECONDS, so a failure here is a gap it did not see)."""
    try:
        expect(page.locator("#timeline tbody tr")).to_have_count(count, timeout=8_000)
    except AssertionError as exc:
        held = page.evaluate(
            """() => { const w = window.dashboard.state.watched;
                       return {lastSeq: w && w.lastSeq, loaded: w && w.loaded, version: w && w.header && w.header.version,
                               seqs: w ? w.events.map((e) => e.seq) : null, stats: window.dashboard.state.stats}; }"""
        )
        db = list(SagaEvent.objects.filter(saga_id=saga_id).order_by("seq").values_list("seq", "kind"))
        raise AssertionError(f"the page holds {held}; the database {db}") from exc


def test_the_page_heals_a_dropped_socket_and_a_gap_in_the_events(page, live_stack, catalogue, alice, ops):
    open_dashboard(page)
    first = place_order(live_stack)["saga"]["id"]
    second = place_order(live_stack, token="tok_declined")["saga"]["id"]
    expect(page.locator(f"#saga-{first}")).to_be_visible(timeout=15_000)
    expect(page.locator(f"#saga-{second}")).to_be_visible(timeout=15_000)

    # Keyboard only: into the list, down to the older saga, Enter selects it.
    page.locator(f"#saga-{second}").focus()
    page.keyboard.press("ArrowDown")
    expect(page.locator(f"#saga-{first}")).to_be_focused()
    page.keyboard.press("Enter")
    expect(page.locator("#saga-id")).to_have_text(first)
    wait_node(page, "mark_shipped", "succeeded")
    # Counted once the saga is at rest: before, its last steps may still be adding events.
    expect(page.locator("#saga-state")).to_have_text("completed", timeout=15_000)
    events_in_db = SagaEvent.objects.filter(saga_id=first).count()
    timeline_has_all_events(page, first, events_in_db)

    # The socket drops (a deploy, a proxy timeout): the page reconnects by itself, reloads the
    # list from a snapshot and watches the selected saga again.
    snapshots = page.evaluate("window.dashboard.state.stats.snapshots")
    page.evaluate("window.dashboard.feed.ws.close()")
    expect(page.locator("#conn")).not_to_have_attribute("data-state", "live")
    expect(page.locator("#conn")).to_have_attribute("data-state", "live", timeout=20_000)
    page.wait_for_function("n => window.dashboard.state.stats.snapshots > n", arg=snapshots)
    expect(page.locator("#saga-id")).to_have_text(first)
    expect(page.locator("#timeline tbody tr")).to_have_count(events_in_db)

    # A change whose events skip some (the channel layer dropped a message): the page asks for
    # the saga again and shows the database's events, not the stray one.
    rewatches = page.evaluate("window.dashboard.state.stats.rewatches")
    page.evaluate(
        """() => {
          const w = window.dashboard.state.watched;
          const stray = {seq: w.lastSeq + 3, step: "", kind: "stray_event", from_state: "", to_state: w.header.state,
                         data: {}, actor: "test", created_at: new Date().toISOString()};
          window.dashboard.feed.onMessage({type: "saga", full: false, saga: w.header, steps: [], events: [stray]});
        }"""
    )
    page.wait_for_function("n => window.dashboard.state.stats.rewatches > n", arg=rewatches)
    expect(page.locator('#timeline tr[data-kind="stray_event"]')).to_have_count(0, timeout=15_000)
    expect(page.locator("#timeline tbody tr")).to_have_count(events_in_db)

    # A hole inside one message (one process's batch carries the next event and the one after
    # the next, while the event between is still on its way from another process): a gap too.
    # Checking only a message's first event, the page once kept such a hole for good.
    gaps = page.evaluate("window.dashboard.state.stats.gaps")
    page.evaluate(
        """() => {
          const w = window.dashboard.state.watched;
          const event = (seq) => ({seq, step: "", kind: "stray_event", from_state: "", to_state: w.header.state,
                                   data: {}, actor: "test", created_at: new Date().toISOString()});
          window.dashboard.feed.onMessage({type: "saga", full: false, saga: w.header, steps: [],
                                           events: [event(w.lastSeq + 1), event(w.lastSeq + 3)]});
        }"""
    )
    page.wait_for_function("n => window.dashboard.state.stats.gaps > n", arg=gaps)
    expect(page.locator('#timeline tr[data-kind="stray_event"]')).to_have_count(0, timeout=15_000)
    expect(page.locator("#timeline tbody tr")).to_have_count(events_in_db)
    assert page.evaluate("window.__noReload") is True
    assert page.js_errors == []
    screenshot(page, "dashboard-09-healed")


def test_an_operator_cancels_an_order_and_skips_a_parked_compensation(page, live_stack, catalogue, alice, ops, root):
    open_dashboard(page)

    # Cancel: the booking takes 8 s, so the order is still cancellable when the operator acts.
    inject_fault(live_stack, service="shipping", operation="schedule", latency_ms=8000)
    saga_id = place_order(live_stack)["saga"]["id"]
    select_in_list(page, saga_id)
    wait_node(page, "schedule_shipment", "running")
    expect(page.locator("#act-cancel")).to_be_enabled()
    page.locator("#act-cancel").click()
    dialog = page.get_by_role("dialog")
    expect(dialog).to_contain_text("Cancel this order?")
    dialog.get_by_label(re.compile("Reason")).fill("customer called: wrong size")
    dialog.get_by_role("button", name="Cancel the order").click()
    page.wait_for_function("() => window.dashboard.state.toasts.some(t => t.title === 'Cancel accepted')")
    for step in ("schedule_shipment", "approve_order", "charge_payment", "reserve_stock"):
        wait_node(page, step, "compensated")
    expect(page.locator("#saga-state")).to_have_text("cancelled")
    expect(page.locator("#saga-failure")).to_contain_text("customer called: wrong size")
    screenshot(page, "dashboard-10-cancelled")

    # Skip: a parked compensation is settled by hand, and the page insists on a reason.
    parked_id, _ = park_on_a_failing_release(page, live_stack)
    select_in_list(page, parked_id)
    wait_node(page, "reserve_stock", "compensation_failed")
    expect(page.locator("#saga-parked")).to_contain_text("Compensation of reserve_stock keeps failing")
    page.locator("#act-skip").click()
    expect(dialog).to_contain_text("Skip a compensation?")
    expect(dialog.get_by_label("Compensation to skip")).to_have_value("reserve_stock")
    dialog.get_by_role("button", name="Skip it").click()
    expect(dialog).to_be_visible()  # refused by the form: no reason given
    assert Saga.objects.get(id=parked_id).state == "parked"
    dialog.get_by_label(re.compile("Reason")).fill("released the 2 mugs by hand, ticket 9")
    dialog.get_by_role("button", name="Skip it").click()
    wait_node(page, "reserve_stock", "skipped")
    expect(page.locator("#saga-state")).to_have_text("compensated", timeout=SAGA_TIMEOUT_MS)
    assert "comp-skipped" in edge_class(page, "c:charge_payment>reserve_stock")
    skipped = page.locator('#timeline tr[data-kind="compensation_skipped"]')
    expect(skipped).to_contain_text("released the 2 mugs by hand, ticket 9")
    event = SagaEvent.objects.get(saga_id=parked_id, kind="compensation_skipped")
    assert event.data["reason"] == "released the 2 mugs by hand, ticket 9"
    assert "ops" in event.actor
    assert page.js_errors == []
    screenshot(page, "dashboard-11-skipped")
