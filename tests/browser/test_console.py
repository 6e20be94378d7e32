"""The operator console in a browser, on a 1400 px desktop and a 390 px phone: search over the
whole history with its filters in the URL (and a notice for bad ones), saved views, bulk retry
with its preview and per-saga outcomes, the step inspector (input with secrets masked), the
light theme and the keyboard.

Screenshots land in test-artifacts/screenshots/console-*.png (look at them).
"""

from __future__ import annotations

import uuid
from datetime import timedelta

import pytest
from django.utils import timezone

from orchestration.definitions import get_definition
from orchestration.models import Saga, SagaEvent, SagaStep
from tests.browser.conftest import SCREENSHOTS, expect, screenshot
from tests.browser.test_dashboard import open_dashboard
from tests.conftest import ADDRESS, make_operator

pytestmark = pytest.mark.django_db(transaction=True, databases="__all__")

DESKTOP = {"width": 1400, "height": 900}
PHONE = {"width": 390, "height": 844}
PAGE_WIDTH = "() => document.documentElement.scrollWidth"


@pytest.fixture
def ops():
    return make_operator("ops")


def stored_saga(*, state="completed", failure=None, age_days=0.0, failed_step=None, token=None) -> Saga:
    """A saga as the engine leaves it, written directly (an old one: the live feed's snapshot
    does not have it). `failed_step`: every step before it succeeded, it failed. `token`: a raw
    card token in the charge's result (a careless gateway adapter), which the inspector masks."""
    definition = get_definition("place_order")
    context = {
        "order_id": str(uuid.uuid4()),
        "customer_id": 1,
        "customer_email": "carol@example.com",
        "items": [{"sku": "SKU-MUG", "quantity": 1}],
        "amount": "12.50",
        "currency": "EUR",
        "payment_method": "pm_" + uuid.uuid4().hex,
        "shipping_address": dict(ADDRESS),
        "mode": "orchestrated",
    }
    saga = Saga.objects.create(definition=definition.name, context=context, failure=failure)
    names = [s.name for s in definition.steps]
    upto = names.index(failed_step) if failed_step else len(names)
    for position, spec in enumerate(definition.steps):
        step = SagaStep.objects.create(saga=saga, name=spec.name, position=position, service=spec.service)
        step_state = "succeeded" if position < upto else "failed" if position == upto else "pending"
        secret = {"card_token": token} if token and spec.name == "charge_payment" else {}
        SagaStep.objects.filter(id=step.id).update(
            state=step_state,
            attempts=1 if step_state != "pending" else 0,
            result={"ok": True, **secret} if step_state == "succeeded" else None,
            error={"code": "smtp_down", "message": "Mail server down"} if step_state == "failed" else None,
        )
    for position, spec in enumerate(definition.on_failure):
        SagaStep.objects.create(saga=saga, name=spec.name, kind="on_failure", position=position, service=spec.service)
    events = [SagaEvent(saga=saga, seq=1, kind="saga_created", to_state="pending", data={"definition": "place_order"})]
    for spec in definition.steps[: upto + 1 if failed_step else upto]:
        events.append(
            SagaEvent(saga=saga, seq=len(events) + 1, step=spec.name, kind="step_started", data={"attempt": 1})
        )
    SagaEvent.objects.bulk_create(events)
    Saga.objects.filter(id=saga.id).update(
        state=state, version=len(events), created_at=timezone.now() - timedelta(days=age_days)
    )
    return Saga.objects.get(id=saga.id)


def viewport_shot(page, name: str, selector: str) -> None:
    """What the screen shows with `selector` scrolled to the top (a phone's full page is too
    long to read at once)."""
    page.locator(selector).evaluate("el => el.scrollIntoView({block: 'start'})")
    page.wait_for_timeout(200)
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(SCREENSHOTS / f"{name}.png"))


def resize(page, viewport):
    page.set_viewport_size(viewport)
    page.wait_for_timeout(300)


def test_search_the_whole_history_with_the_filters_in_the_url(page, live_stack, ops):
    declined = [
        stored_saga(state="compensated", failure={"code": "card_declined", "message": "Declined"}, age_days=40 + i)
        for i in range(55)
    ]
    for _ in range(3):
        stored_saga(age_days=2)
    open_dashboard(page)

    # A shared link: the filters in its URL are applied, server-side, over the whole history.
    page.goto("/dashboard/?failure_code=card_declined")
    expect(page.locator("#results-bar")).to_contain_text("55 sagas match")
    expect(page.locator("#saga-list li.saga-row")).to_have_count(50)
    expect(page.locator("#f-failure_code")).to_have_value("card_declined")
    expect(page.locator("#page-info")).to_have_text("page 1 of 2")
    screenshot(page, "console-search-desktop")
    page.locator("#page-next").click()
    expect(page.locator("#saga-list li.saga-row")).to_have_count(5)
    assert "page=2" in page.url
    oldest = str(declined[-1].id)
    expect(page.locator(f"#saga-{oldest}")).to_be_visible()

    # The search box: a saga id finds that saga however old.
    page.locator("#search-clear").click()
    page.locator("#f-q").fill(oldest)
    page.locator("#f-q").press("Enter")
    expect(page.locator("#saga-list li.saga-row")).to_have_count(1)
    assert f"q={oldest}" in page.url
    page.locator(f"#saga-{oldest}").click()
    expect(page.locator("#saga-id")).to_have_text(oldest)
    assert f"q={oldest}" in page.url  # selecting keeps the filters in the URL

    # The time-range picker: the last 7 days leave out the 40-day-old ones.
    page.goto("/dashboard/")
    page.locator("#more-filters summary").click()
    page.locator("#f-range").select_option("604800")
    expect(page.locator("#results-bar")).to_contain_text("3 sagas match")
    assert "newer_than=604800" in page.url

    # A saved view: stored for this user, reopened from the list.
    page.once("dialog", lambda dialog: dialog.accept("last week"))
    page.locator("#view-save").click()
    expect(page.locator("#saved-views option", has_text="last week")).to_have_count(1)
    page.goto("/dashboard/")
    expect(page.locator("#saved-views option", has_text="last week")).to_have_count(1)
    page.locator("#saved-views").select_option(label="last week")
    expect(page.locator("#results-bar")).to_contain_text("3 sagas match")

    resize(page, PHONE)
    page.goto("/dashboard/?failure_code=card_declined")
    expect(page.locator("#results-bar")).to_contain_text("55 sagas match")
    screenshot(page, "console-search-phone")
    viewport_shot(page, "console-search-phone-list", ".list-panel")
    assert page.evaluate(PAGE_WIDTH) <= PHONE["width"]
    assert page.js_errors == []


@pytest.mark.parametrize(
    ("query", "field"),
    [("created_after=yesterday", "created_after"), ("state=exploded", "state"), ("page=0", "page")],
)
def test_bad_filters_in_the_url_give_a_notice_not_an_empty_screen(page, live_stack, ops, query, field):
    open_dashboard(page)
    page.goto(f"/dashboard/?{query}")

    notice = page.locator("#notice")
    expect(notice).to_be_visible()
    expect(notice).to_contain_text(field)
    expect(page.locator("#conn")).to_have_attribute("data-state", "live")  # the rest of the page works
    if field == "created_after":
        screenshot(page, "console-bad-filter")
    assert page.js_errors == []


def test_bulk_retry_from_the_dashboard_previews_then_reports_each_saga(page, live_stack, ops, catalogue):
    parked = [stored_saga(state="parked", failed_step="notify_customer") for _ in range(3)]
    done = stored_saga(state="completed")
    open_dashboard(page)
    page.goto("/dashboard/?state=parked")
    expect(page.locator("#results-bar")).to_contain_text("3 sagas match")

    # Tick the three parked sagas and the completed one (found by its id).
    for saga in parked:
        page.locator(f"#saga-{saga.id} input.pick").check()
    page.locator("#search-clear").click()  # the ticks stay across searches
    page.locator("#f-q").fill(str(done.id))
    page.locator("#f-q").press("Enter")
    page.locator(f"#saga-{done.id} input.pick").check()
    expect(page.locator("#bulk-count")).to_have_text("4 selected")

    page.locator("[data-bulk=retry]").click()
    dialog = page.locator("#bulk-dialog")
    expect(dialog.locator("#bulk-title")).to_have_text("Retry 3 sagas?")
    expect(dialog.locator("#bulk-preview")).to_contain_text("3 of 4")
    expect(dialog.locator("#bulk-preview")).to_contain_text("1 not eligible")
    expect(dialog.locator("#bulk-preview")).to_contain_text("A completed saga cannot be retried")
    screenshot(page, "console-bulk-preview")
    page.locator("#bulk-reason").fill("mail server back")
    page.locator("#bulk-confirm").click()
    expect(page.locator("#bulk-progress-text")).to_have_text("Done: 3 retried.")
    expect(page.locator("#bulk-results li.ok")).to_have_count(3)
    screenshot(page, "console-bulk-done")

    events = SagaEvent.objects.filter(kind="operator_retry")
    assert sorted(str(e.saga_id) for e in events) == sorted(str(s.id) for s in parked)
    assert {(e.actor, e.data["reason"]) for e in events} == {("user:ops", "mail server back")}
    assert page.js_errors == []


def test_the_step_inspector_shows_the_input_masked_from_the_graph_and_the_timeline(page, live_stack, ops):
    saga = stored_saga(state="parked", failed_step="notify_customer", token="tok_live_secret_9876")
    open_dashboard(page)
    page.goto(f"/dashboard/?q={saga.id}")
    page.locator(f"#saga-{saga.id}").click()
    expect(page.locator("#saga-id")).to_have_text(str(saga.id))

    # From the timeline: the charge's row opens its details.
    page.locator("#timeline tr[data-step=charge_payment]").first.click()
    inspector = page.locator("#inspector")
    expect(inspector).to_be_visible()
    expect(inspector.locator("#inspector-title")).to_have_text("Step charge_payment")
    expect(inspector).to_contain_text("••••9876")
    expect(inspector).not_to_contain_text("tok_live_secret")
    expect(inspector).to_contain_text('"amount": "12.50"')
    expect(inspector).to_contain_text(saga.context["payment_method"])

    # From the graph, by keyboard: arrows walk the steps, the details follow.
    page.locator("#saga-graph").focus()
    page.keyboard.press("End")  # notify_failure, the last of the failure path
    page.keyboard.press("ArrowUp")  # reject_order
    page.keyboard.press("ArrowUp")  # notify_customer
    expect(inspector.locator("#inspector-title")).to_have_text("Step notify_customer")
    expect(inspector).to_contain_text("smtp_down")
    expect(inspector).to_contain_text("carol@example.com")
    screenshot(page, "console-inspector-desktop")
    export = page.locator("#export-json")
    assert export.get_attribute("href") == f"/api/sagas/{saga.id}/export/?download=1"

    resize(page, PHONE)
    screenshot(page, "console-inspector-phone")
    viewport_shot(page, "console-inspector-phone-view", "#inspector")
    assert page.evaluate(PAGE_WIDTH) <= PHONE["width"]
    assert page.js_errors == []


def test_light_theme_follows_the_system_and_the_toggle_and_the_keyboard_reaches_everything(page, live_stack, ops):
    parked = stored_saga(state="parked", failed_step="notify_customer")
    page.emulate_media(color_scheme="light")
    open_dashboard(page)
    assert page.evaluate("document.documentElement.dataset.theme") == "light"
    page.goto(f"/dashboard/#saga={parked.id}")
    expect(page.locator("#saga-id")).to_have_text(str(parked.id))
    for name, viewport in (("desktop", DESKTOP), ("phone", PHONE)):
        resize(page, viewport)
        screenshot(page, f"console-light-{name}")
        assert page.evaluate(PAGE_WIDTH) <= viewport["width"], name
    viewport_shot(page, "console-light-phone-list", ".list-panel")
    viewport_shot(page, "console-light-phone-saga", "#saga-panel")
    resize(page, DESKTOP)
    # State is never colour alone: every row's badge says it in words.
    badge = page.locator(f"#saga-{parked.id} .sbadge").first
    expect(badge).to_have_text("parked")

    page.locator("#theme-toggle").click()
    assert page.evaluate("document.documentElement.dataset.theme") == "dark"
    page.reload()
    assert page.evaluate("document.documentElement.dataset.theme") == "dark"  # remembered
    screenshot(page, "console-dark-desktop")

    # The keyboard: / to search, arrows in the list, x to tick for a bulk action.
    page.locator("body").click(position={"x": 5, "y": 300})
    page.keyboard.press("/")
    assert page.evaluate("document.activeElement.id") == "f-q"
    page.locator(f"#saga-{parked.id}").focus()
    page.keyboard.press("x")
    expect(page.locator("#bulk-count")).to_have_text("1 selected")
    page.keyboard.press("Enter")
    expect(page.locator("#saga-id")).to_have_text(str(parked.id))
    assert page.js_errors == []
