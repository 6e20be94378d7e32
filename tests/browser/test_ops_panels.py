"""The dashboard's operations panels in a real browser: an alert that fired, with its delivery
state, and the stock contention the inventory service recorded (the hottest SKU, per-minute
bars), and the payments node's circuit breaker once it opens. The contention counts and the
breakers live in Redis, shared with the served stack: production mode only."""

from __future__ import annotations

import pytest
from django.conf import settings
from playwright.sync_api import expect

from inventory import contention
from orchestration import alerting
from orchestration.models import Alert, AlertChannel
from sagaplatform.kernel import breakers, registry
from tests.browser.conftest import login, screenshot
from tests.conftest import make_operator
from tests.processes import wait_for

pytestmark = [pytest.mark.django_db(transaction=True, databases="__all__"), pytest.mark.production]


@pytest.fixture
def ops():
    return make_operator("ops")


def _every_queue_served() -> bool:
    instances = registry.snapshot_view()["instances"]
    served = {queue for i in instances if i["alive"] for queue in i["queues"]}
    return set(settings.SAGA_QUEUES) <= served


def test_the_alerts_and_contention_panels_show_what_was_recorded(page, live_stack, ops, settings):
    settings.BREAKER_ENABLED = True  # in this process, which records the failures
    contention.reset()
    # The flush after the previous test emptied the service registry too, until the stack's worker
    # next beats: an alert evaluation in that window finds no live worker for any queue. Those
    # alerts are the harness's, not this test's: look for the one this test records.
    wait_for(_every_queue_served, timeout=20, interval=0.2, message="the stack's worker in the registry again")
    login(page, "ops", "ops-pass")
    page.goto("/dashboard/")
    expect(page.locator("#conn")).to_have_attribute("data-state", "live")
    expect(page.locator("#alert-groups li", has_text="dead-lettered message(s)")).to_have_count(0)

    AlertChannel.objects.create(name="oncall", kind="email", target="oncall@example.com")
    Alert.objects.create(kind=Alert.Kind.DEAD_LETTER, message="unreadable")
    alerting.evaluate(rules=["dead_letter"])  # its delivery is the live stack's worker's to send
    for _ in range(3):
        contention.record(sku="SKU-HOT", conflicts=4, reserved=True)
    contention.record(sku="SKU-HOT", conflicts=3, exhausted=True)
    contention.record(sku="SKU-WARM", conflicts=1, reserved=True)
    # The payments breaker opens: its node says so (the live stack reads the same Redis).
    breakers.reset()
    for _ in range(settings.BREAKER_MIN_CALLS):
        breakers.record("payments", False)

    # The stack's beat evaluates every rule too (the breaker this test opens, a worker the registry
    # has not seen yet since the last flush): find the dead-letter group among them, not by place.
    alert = page.locator("#alert-groups li", has_text="dead-lettered message(s)")
    expect(alert).to_contain_text("1 dead-lettered message(s) to look at", timeout=20_000)
    expect(alert).to_have_attribute("data-status", "firing")
    expect(alert).to_contain_text("1 delivered", timeout=20_000)
    skus = page.locator("#contention-skus li")
    expect(skus).to_have_count(2, timeout=20_000)
    expect(skus.first).to_have_attribute("data-sku", "SKU-HOT")
    expect(skus.first).to_contain_text("15 conflicts · 3 reservations · 1 out of attempts")
    expect(page.locator("#contention-total")).to_contain_text("3.2 conflicts/min · 1 gave up")
    assert page.locator("#contention-chart rect").count() == contention.MINUTES
    wait_for(
        lambda: page.evaluate("window.dashboard.platformCy.$id('payments').data('breaker')") == "open",
        timeout=20,
        message="the payments node to show its breaker open",
    )
    assert "breaker open" in page.evaluate("window.dashboard.platformCy.$id('payments').data('label')")
    assert page.evaluate("window.dashboard.platformCy.$id('inventory').data('breaker')") == "closed"
    assert page.js_errors == []
    screenshot(page, "ops-panels")
    contention.reset()
    breakers.reset()
