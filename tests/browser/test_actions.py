"""The dashboard's action buttons follow the server's answer (the feed's `actions`), through a
choreographed order's whole flow, the dispatch included.

The page records, after every batch of the feed it applies and four times a second, the watched
saga's `actions` and whether each button is disabled. Every record must agree: a button is
enabled exactly while its action is allowed (and, for a cancel with `until`, until then). The
dispatch is slowed by a fault so that the tracker's margin before it lasts: there the Cancel
button must be disabled, and the operator API refuses the cancel (409 `shipment_in_progress`).
"""

from __future__ import annotations

from datetime import datetime

import pytest
from playwright.sync_api import expect

from orchestration.models import Saga
from tests.browser.conftest import screenshot
from tests.browser.test_dashboard import SAGA_TIMEOUT_MS, api, inject_fault, open_dashboard, select_in_list, wait_node
from tests.conftest import make_operator, order_body

pytestmark = pytest.mark.django_db(transaction=True, databases="__all__")

BUTTON_RECORDER = """
window.__buttons = [];
const __sample = (why) => {
  const d = window.dashboard;
  const w = d?.state?.watched;
  if (!w?.loaded || !w.header || w.id !== d.state.selectedId || d.state.pending.size) return;
  const disabled = (k) => document.getElementById(`act-${k}`).disabled;
  window.__buttons.push({
    why, at: Date.now(), state: w.header.state, version: w.header.version, actions: w.header.actions,
    dispatch: w.steps.get("dispatch_shipment")?.state ?? null,
    disabled: {cancel: disabled("cancel"), retry: disabled("retry"), skip: disabled("skip")},
  });
};
window.__onFeedApplied = () => __sample("feed");
setInterval(() => __sample("tick"), 250);
"""
# The page re-renders the buttons once a second: an allowed cancel past its `until` may show
# enabled that long.
TICK_MS = 1200


@pytest.fixture
def ops():
    return make_operator("ops")


@pytest.fixture
def root(django_user_model):
    return django_user_model.objects.create_superuser("root", "root@example.com", "root-pass")


def mismatches(samples: list[dict]) -> list[dict]:
    wrong = []
    for sample in samples:
        for kind, action in sample["actions"].items():
            until = datetime.fromisoformat(action["until"]).timestamp() * 1000 if action["until"] else None
            if action["allowed"] and until and until <= sample["at"] < until + TICK_MS:
                continue  # expiring: the next tick disables it
            enabled = action["allowed"] and not (until and sample["at"] >= until)
            if sample["disabled"][kind] == enabled:
                wrong.append({"kind": kind, **sample})
    return wrong


def test_the_buttons_follow_the_feeds_actions_through_a_choreographed_dispatch(
    page, live_stack, catalogue, alice, ops, root
):
    # The parcel leaves 4 s after booking (conftest); the dispatch itself then takes 4 s, so the
    # tracker hears of it late and its margin before the dispatch lasts.
    inject_fault(live_stack, service="shipping", operation="dispatch", latency_ms=4000)
    page.add_init_script(BUTTON_RECORDER)
    open_dashboard(page)
    status, receipt = api(
        live_stack,
        "POST",
        "/api/orders/",
        {**order_body(), "mode": "choreography"},
        user="alice",
        password="alice-pass",
    )
    assert status == 202, receipt
    saga_id = receipt["saga"]["id"]
    select_in_list(page, saga_id)

    # Booked: cancellable until 1 s before the dispatch.
    wait_node(page, "schedule_shipment", "succeeded")
    expect(page.locator("#act-cancel")).to_be_enabled()
    # Within the margin: no message arrives, the button turns disabled on its own...
    expect(page.locator("#act-cancel")).to_be_disabled(timeout=10_000)
    assert Saga.objects.get(id=saga_id).state == "running"
    screenshot(page, "actions-cancel-refused-before-the-dispatch")
    # ...and the server refuses the cancel the button no longer offers.
    status, answer = api(
        live_stack,
        "POST",
        f"/api/sagas/{saga_id}/cancel/",
        {"reason": "too late"},
        user="root",
        password="root-pass",
    )
    assert (status, answer["code"]) == (409, "shipment_in_progress"), answer

    wait_node(page, "dispatch_shipment", "succeeded")
    expect(page.locator("#saga-state")).to_have_text("completed", timeout=SAGA_TIMEOUT_MS)
    page.wait_for_timeout(600)  # a last few samples of the finished saga

    samples = page.evaluate("window.__buttons")
    assert mismatches(samples) == []
    running = [s for s in samples if s["state"] == "running"]
    assert any(not s["disabled"]["cancel"] for s in running), "cancel was offered before the dispatch"
    assert any(s["disabled"]["cancel"] and s["dispatch"] == "pending" for s in running), "the margin was sampled"
    assert all(s["disabled"]["cancel"] for s in samples if s["state"] == "completed")
    assert page.js_errors == []
