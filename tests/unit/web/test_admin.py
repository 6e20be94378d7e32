"""The Django admin, through Django's test client: every list, filter and search loads; history
stays read-only; operator actions ask for a reason, go through the engine or the service layer,
record who and why, and report the rows the state machines refuse; stock edits are guarded by
the row's version."""

from __future__ import annotations

import re

import pytest
from django.apps import apps
from django.contrib import admin
from django.contrib.auth.models import Permission
from django.contrib.messages import get_messages
from django.db.models import F
from django.test import Client, RequestFactory
from django.urls import reverse

from inventory import services as inventory
from inventory.models import StockItem
from orchestration.audit import run_audit
from orchestration.models import Alert, Saga, SagaEvent, SagaStep
from orders.models import Order, OrderStatusChange
from payments.models import Charge, LedgerEntry
from sagaplatform.kernel import faults
from sagaplatform.kernel.models import Barrier, FaultRule, OutboxMessage
from tests.conftest import deliver_until, make_user, mug, order_body

pytestmark = pytest.mark.django_db(transaction=True, databases="__all__")

SAGAS = "/admin/orchestration/saga/"
ORDERS = "/admin/orders/order/"
PROJECT_APPS = ("orders", "inventory", "payments", "shipping", "notifications", "orchestration", "kernel")


# --- Helpers ----------------------------------------------------------------------------------


def place(api, **kwargs) -> dict:
    response = api.post("/api/orders/", order_body(**kwargs), format="json")
    assert response.status_code == 202, response.content
    return response.json()


def inject(service: str, **rule) -> FaultRule:
    created = FaultRule.objects.using(service).create(service=service, **rule)
    faults.clear_cache()
    return created


def park_by_failing_refund(api, broker) -> str:
    """A saga parked on a compensation: shipping refuses for good, then every refund fails."""
    refund = inject("payments", operation="refund", failure_rate=1.0)
    saga_id = place(api)["saga"]["id"]
    inject("shipping", operation="schedule", fail_first=99)
    broker.deliver()
    assert Saga.objects.get(id=saga_id).state == "parked"
    refund.delete()
    FaultRule.objects.using("shipping").all().delete()
    faults.clear_cache()
    return saga_id


def completed_order(api, broker) -> dict:
    receipt = place(api)
    broker.deliver()
    assert Saga.objects.get(id=receipt["saga"]["id"]).state == "completed"
    return receipt


def messages_of(response) -> list[str]:
    return [str(m) for m in get_messages(response.wsgi_request)]


def operator_events(saga_id, kind: str) -> list[tuple[str, str]]:
    return [(e.actor, e.data.get("reason")) for e in SagaEvent.objects.filter(saga_id=saga_id, kind=kind)]


@pytest.fixture
def viewer(db) -> Client:
    """Staff who may look at everything but change nothing: no operate, no change permission."""
    user = make_user("viewer", staff=True)
    user.user_permissions.set(
        Permission.objects.filter(codename__startswith="view_", content_type__app_label__in=PROJECT_APPS)
    )
    client = Client()
    client.force_login(user)
    return client


# --- Every list loads -------------------------------------------------------------------------


def test_every_model_of_the_platform_has_an_admin():
    missing = [
        model._meta.label
        for label in PROJECT_APPS
        for model in apps.get_app_config(label).get_models()
        if model not in admin.site._registry and model._meta.model_name != "orderline"  # an inline of Order
    ]
    assert missing == []


def changelists() -> list[tuple[str, str | None, bool]]:
    """(URL, database, whether to try every filter) for every registered changelist of the
    platform, per database when the model's table is in several (the filters are the same in
    each: tried in one)."""
    urls = []
    for model, model_admin in admin.site._registry.items():
        if model._meta.app_label not in PROJECT_APPS:
            continue
        url = reverse(f"admin:{model._meta.app_label}_{model._meta.model_name}_changelist")
        for i, alias in enumerate(getattr(model_admin, "database_aliases", [None])):
            urls.append((url, alias, i == 0))
    return urls


def test_every_changelist_loads_with_each_filter_and_a_search(admin_client, alice_api, catalogue, broker):
    receipt = completed_order(alice_api, broker)
    park_by_failing_refund(alice_api, broker)
    inject("inventory", operation="reserve", latency_ms=1)
    order_id = receipt["id"]

    for url, alias, every_filter in changelists():
        base = {"db": alias} if alias else {}
        response = admin_client.get(url, base)
        assert response.status_code == 200, (url, alias)
        changelist = response.context["cl"]
        for spec in changelist.filter_specs if every_filter else []:
            for choice in spec.choices(changelist):
                # Each choice's rows, as the view gets them (`get_changelist_instance`, which
                # counts and reads the page): an invalid lookup raises here where the view would
                # redirect to `?e=1`. The page around the rows is the one rendered above (each
                # rendering cost 60 ms, and there are some 250 choices).
                request = RequestFactory().get(url + choice["query_string"])
                request.user = response.wsgi_request.user
                filtered = changelist.model_admin.get_changelist_instance(request)
                assert filtered.result_count == len(filtered.result_list) or filtered.multi_page, choice
        searched = admin_client.get(url, {**base, "q": order_id})
        assert searched.status_code == 200, (url, alias)
        assert searched.context["cl"].result_count >= 0

    # The searches find the order by its id, wherever it is named.
    for url, expected in [
        (ORDERS, 1),
        (SAGAS, 1),
        ("/admin/payments/charge/", 1),
        ("/admin/shipping/shipment/", 1),
        ("/admin/inventory/reservation/", 1),
        ("/admin/orders/orderstatuschange/", 3),  # placed, approved, shipped
    ]:
        assert admin_client.get(url, {"q": order_id}).context["cl"].result_count == expected, url
    # ...and the saga by its id, the order by its SKU and its customer.
    assert admin_client.get(SAGAS, {"q": receipt["saga"]["id"]}).context["cl"].result_count == 1
    assert admin_client.get(ORDERS, {"q": "SKU-MUG"}).context["cl"].result_count == 2
    assert admin_client.get(ORDERS, {"q": "alice@example.com"}).context["cl"].result_count == 2
    assert admin_client.get(ORDERS, {"q": "SKU-LAMP"}).context["cl"].result_count == 0


def test_saga_filters_select_what_they_say(admin_client, alice_api, catalogue, broker):
    done = completed_order(alice_api, broker)["saga"]["id"]
    parked = park_by_failing_refund(alice_api, broker)

    def listed(**params) -> set[str]:
        response = admin_client.get(SAGAS, params)
        assert response.status_code == 200
        return {str(saga.id) for saga in response.context["cl"].result_list}

    assert listed(attention="parked") == {parked}
    assert listed(attention="stuck") == {parked}
    assert listed(attention="alert") == {parked}
    assert listed(state="completed") == {done}
    assert listed(style="orchestrated") == {done, parked}
    assert listed(style="tcc") == set()
    assert listed(created_at_age="5m") == {done, parked}
    assert listed(created_at_age="older") == set()
    # The state machine's allowed operator actions are shown per row.
    page = admin_client.get(SAGAS, {"attention": "parked"}).content.decode()
    assert "retry, skip" in page


def test_the_kernel_tables_are_listed_per_database(admin_client, alice_api, catalogue, broker):
    completed_order(alice_api, broker)
    url = "/admin/kernel/barrier/"

    per_db = {
        alias: admin_client.get(url, {"db": alias}).context["cl"].result_count
        for alias in ("orders", "inventory", "payments", "shipping", "notifications")
    }

    assert per_db == {
        alias: Barrier.objects.using(alias).count()
        for alias in ("orders", "inventory", "payments", "shipping", "notifications")
    }
    assert per_db["inventory"] == 2  # reserve, commit
    # No database named: the first one, said in the page's subtitle.
    assert b"Database: orders" in admin_client.get(url).content
    outbox = admin_client.get("/admin/kernel/outboxmessage/", {"db": "default"})
    assert outbox.context["cl"].result_count == OutboxMessage.objects.using("default").count() > 0


def test_a_fault_rule_is_added_and_edited_in_its_service_database(admin_client):
    add = "/admin/kernel/faultrule/add/?_changelist_filters=db%3Dpayments"
    form = {
        "operation": "refund",
        "failure_rate": "0.5",
        "fail_first": "0",
        "latency_ms": "0",
        "hang_seconds": "0",
        "crash_point": "",
        "crashes_left": "1",
        "is_enabled": "on",
    }

    assert admin_client.post(add, form).status_code == 302

    rule = FaultRule.objects.using("payments").get()
    assert (rule.service, rule.operation, rule.failure_rate) == ("payments", "refund", 0.5)
    assert not FaultRule.objects.using("default").exists()
    assert admin_client.get("/admin/kernel/faultrule/", {"db": "payments"}).context["cl"].result_count == 1
    assert admin_client.get("/admin/kernel/faultrule/", {"db": "orders"}).context["cl"].result_count == 0

    change = f"/admin/kernel/faultrule/{rule.id}/change/?_changelist_filters=db%3Dpayments"
    assert admin_client.post(change, {**form, "failure_rate": "2"}).status_code == 200  # out of bounds
    assert admin_client.post(change, {**form, "failure_rate": "0.25"}).status_code == 302
    rule.refresh_from_db(using="payments")
    assert rule.failure_rate == 0.25

    # Switched off from the list, in its own database.
    switched = admin_client.post(
        "/admin/kernel/faultrule/?db=payments",
        {"form-TOTAL_FORMS": "1", "form-INITIAL_FORMS": "1", "form-0-id": str(rule.id), "_save": "Save"},
    )
    assert switched.status_code == 302
    rule.refresh_from_db(using="payments")
    assert rule.is_enabled is False
    assert faults.rules_for("payments") == []

    deleted = admin_client.post(
        f"/admin/kernel/faultrule/{rule.id}/delete/?_changelist_filters=db%3Dpayments", {"post": "yes"}
    )
    assert deleted.status_code == 302
    assert not FaultRule.objects.using("payments").exists()


# --- History is read-only ---------------------------------------------------------------------


READ_ONLY = [
    (SagaEvent, "default", "/admin/orchestration/sagaevent/"),
    (Saga, "default", SAGAS),
    (OrderStatusChange, "orders", "/admin/orders/orderstatuschange/"),
    (Order, "orders", ORDERS),
    (LedgerEntry, "payments", "/admin/payments/ledgerentry/"),
    (Charge, "payments", "/admin/payments/charge/"),
    (Barrier, "inventory", "/admin/kernel/barrier/"),
    (OutboxMessage, "orders", "/admin/kernel/outboxmessage/"),
]


def test_event_logs_ledgers_and_saga_owned_rows_refuse_add_change_delete(admin_client, alice_api, catalogue, broker):
    completed_order(alice_api, broker)

    for model, alias, url in READ_ONLY:
        obj = model.objects.using(alias).first()
        keep = f"?_changelist_filters=db%3D{alias}"
        change = f"{url}{obj.pk}/change/{keep}"
        before = model.objects.using(alias).filter(pk=obj.pk).values().get()

        assert admin_client.get(f"{url}add/").status_code == 403, url
        assert admin_client.get(f"{url}{obj.pk}/delete/{keep}").status_code == 403, url
        assert admin_client.post(change, {"reason": "edited", "kind": "x"}).status_code == 403, url
        view = admin_client.get(change)
        assert view.status_code == 200, url  # still viewable
        assert b'name="_save"' not in view.content, url
        assert admin_client.post(
            url + keep, {"action": "delete_selected", "_selected_action": [obj.pk]}
        ).status_code in (
            200,
            302,
        )
        assert model.objects.using(alias).filter(pk=obj.pk).values().get() == before, url


# --- Operator actions on sagas ----------------------------------------------------------------


def test_saga_retry_shows_the_reason_page_first_then_records_actor_and_reason(
    admin_client, alice_api, catalogue, broker
):
    done = completed_order(alice_api, broker)["saga"]["id"]
    parked = park_by_failing_refund(alice_api, broker)
    form = {"action": "retry_sagas", "_selected_action": [parked, done]}

    asked = admin_client.post(SAGAS, form)

    assert asked.status_code == 200
    page = asked.content.decode()
    assert 'name="reason"' in page
    assert "1 of 2 selected" in page
    assert "left alone: a completed saga cannot be retried" in page
    assert Saga.objects.get(id=parked).state == "parked"  # nothing happens before the reason
    assert not SagaEvent.objects.filter(kind="operator_retry").exists()

    no_reason = admin_client.post(SAGAS, {**form, "apply": "1", "reason": ""})
    assert no_reason.status_code == 200  # the page again, with the form's error
    assert Saga.objects.get(id=parked).state == "parked"

    applied = admin_client.post(SAGAS, {**form, "apply": "1", "reason": "refund gateway repaired"})
    assert applied.status_code == 302
    broker.deliver()

    assert Saga.objects.get(id=parked).state == "compensated"
    assert operator_events(parked, "operator_retry") == [("user:admin", "refund gateway repaired")]
    assert operator_events(done, "operator_retry") == []  # the refused row was left alone
    reported = messages_of(applied)
    assert f"1 saga left alone (a completed saga cannot be retried): {done}" in reported
    assert "1 saga retried." in reported
    assert Alert.objects.get(saga_id=parked).resolved_by == "user:admin"
    assert run_audit() == []


def test_saga_skip_settles_the_parked_compensation_with_the_reason(admin_client, alice_api, catalogue, broker):
    inject("payments", operation="refund", failure_rate=1.0)  # keep the refund failing: skip it
    saga_id = place(alice_api)["saga"]["id"]
    inject("shipping", operation="schedule", fail_first=99)
    broker.deliver()
    assert Saga.objects.get(id=saga_id).state == "parked"

    response = admin_client.post(
        SAGAS,
        {
            "action": "skip_parked_compensations",
            "_selected_action": [saga_id],
            "apply": "1",
            "reason": "refunded by hand, ticket 42",
        },
    )

    assert response.status_code == 302
    broker.deliver()
    assert Saga.objects.get(id=saga_id).state == "compensated"
    assert SagaStep.objects.get(saga_id=saga_id, name="charge_payment").state == "skipped"
    assert operator_events(saga_id, "compensation_skipped") == [("user:admin", "refunded by hand, ticket 42")]
    assert mug() == (50, 0)  # the rest was undone


def test_saga_cancel_compensates_through_the_engine_and_reports_refusals(
    admin_client, alice_api, catalogue, broker, settings
):
    done = completed_order(alice_api, broker)["saga"]["id"]
    settings.SHIPPING_HANDLING_SECONDS = 3600  # the next order waits in its handling window
    receipt = place(alice_api)
    broker.deliver()
    running = receipt["saga"]["id"]
    assert Saga.objects.get(id=running).state == "running"

    response = admin_client.post(
        SAGAS,
        {"action": "cancel_sagas", "_selected_action": [running, done], "apply": "1", "reason": "fraud check"},
    )

    assert response.status_code == 302
    assert Saga.objects.get(id=running).state == "compensating"
    broker.deliver()
    assert Saga.objects.get(id=running).state == "cancelled"
    assert Order.objects.using("orders").get(id=receipt["id"]).status == "cancelled"
    assert operator_events(running, "saga_cancel_requested") == [("user:admin", "fraud check")]
    assert Saga.objects.get(id=done).state == "completed"
    assert f"1 saga left alone (this order can no longer be cancelled (it is completed)): {done}" in messages_of(
        response
    )
    assert run_audit() == []


def test_staff_without_the_operate_permission_cannot_act_on_sagas(viewer, alice_api, catalogue, broker):
    parked = park_by_failing_refund(alice_api, broker)

    page = viewer.get(SAGAS)
    assert page.status_code == 200
    assert b"retry_sagas" not in page.content
    assert b"cancel_sagas" not in page.content

    response = viewer.post(
        SAGAS, {"action": "retry_sagas", "_selected_action": [parked], "apply": "1", "reason": "sneaky"}
    )

    assert response.status_code in (200, 302)
    assert Saga.objects.get(id=parked).state == "parked"
    assert not SagaEvent.objects.filter(kind="operator_retry").exists()
    # Nor may they resolve its alert.
    viewer.post(
        "/admin/orchestration/alert/", {"action": "resolve_alerts", "_selected_action": [Alert.objects.get().id]}
    )
    assert Alert.objects.get().resolved_at is None


def test_an_alert_is_resolved_once_with_who_resolved_it(admin_client, alice_api, catalogue, broker):
    park_by_failing_refund(alice_api, broker)
    alert = Alert.objects.get()
    form = {"action": "resolve_alerts", "_selected_action": [alert.id]}

    first = admin_client.post("/admin/orchestration/alert/", form)
    second = admin_client.post("/admin/orchestration/alert/", form)

    alert.refresh_from_db()
    assert alert.resolved_by == "user:admin"
    assert alert.resolved_at is not None
    assert "1 alert(s) resolved." in messages_of(first)
    assert f"Alert {alert.id}: already resolved" in messages_of(second)


# --- Operator actions on orders ---------------------------------------------------------------


def test_order_cancel_through_the_admin_cancels_the_saga(admin_client, alice_api, catalogue, broker, settings):
    shipped = completed_order(alice_api, broker)["id"]
    settings.SHIPPING_HANDLING_SECONDS = 3600
    receipt = place(alice_api)
    broker.deliver()
    assert Order.objects.using("orders").get(id=receipt["id"]).status == "approved"
    form = {"action": "cancel_orders", "_selected_action": [receipt["id"], shipped]}

    asked = admin_client.post(ORDERS, form)
    assert asked.status_code == 200
    assert (
        "left alone: the order is shipped; only a pending or approved order can be cancelled" in asked.content.decode()
    )

    response = admin_client.post(ORDERS, {**form, "apply": "1", "reason": "customer phoned"})

    assert response.status_code == 302
    broker.deliver()
    order = Order.objects.using("orders").get(id=receipt["id"])
    assert (order.status, order.failure_code, order.failure_message) == ("cancelled", "cancelled", "customer phoned")
    saga = Saga.objects.get(id=receipt["saga"]["id"])
    assert saga.state == "cancelled"
    assert operator_events(saga.id, "saga_cancel_requested") == [("user:admin", "customer phoned")]
    assert Charge.objects.using("payments").get(order_id=receipt["id"]).state == "refunded"
    assert Order.objects.using("orders").get(id=shipped).status == "shipped"
    assert (
        f"1 order left alone (the order is shipped; only a pending or approved order can be cancelled): {shipped}"
        in messages_of(response)
    )
    assert run_audit() == []


def test_an_order_page_links_its_saga_and_shows_its_progress(admin_client, alice_api, catalogue, broker):
    receipt = completed_order(alice_api, broker)

    page = admin_client.get(f"{ORDERS}{receipt['id']}/change/").content.decode()

    assert f'href="{SAGAS}{receipt["saga"]["id"]}/change/"' in page
    assert "completed (reserve_stock: succeeded" in page
    assert "25.00 EUR" in page
    listed = admin_client.get(ORDERS).content.decode()
    assert "alice@example.com" in listed
    assert "25.00 EUR" in listed


def test_order_cancel_the_saga_refuses_is_reported_and_changes_nothing(admin_client, alice_api, catalogue, broker):
    receipt = place(alice_api)
    deliver_until(broker, "shipping.execute")
    broker.run(broker.queue.pop(0))  # schedule
    deliver_until(broker, "shipping.execute")  # the dispatch command is on its way
    assert Order.objects.using("orders").get(id=receipt["id"]).status == "approved"  # the FSM allows it

    response = admin_client.post(
        ORDERS, {"action": "cancel_orders", "_selected_action": [receipt["id"]], "apply": "1", "reason": "too late"}
    )

    assert response.status_code == 302
    reported = messages_of(response)
    assert any(m.startswith(f"order {receipt['id']}: refused: The parcel is leaving") for m in reported), reported
    broker.deliver()
    assert Saga.objects.get(id=receipt["saga"]["id"]).state == "completed"
    assert Order.objects.using("orders").get(id=receipt["id"]).status == "shipped"


def test_staff_without_the_change_permission_cannot_cancel_orders(viewer, alice_api, catalogue, broker, settings):
    settings.SHIPPING_HANDLING_SECONDS = 3600
    receipt = place(alice_api)
    broker.deliver()

    assert b"cancel_orders" not in viewer.get(ORDERS).content
    viewer.post(ORDERS, {"action": "cancel_orders", "_selected_action": [receipt["id"]], "apply": "1", "reason": "x"})

    assert Saga.objects.get(id=receipt["saga"]["id"]).state == "running"
    assert viewer.get("/admin/inventory/stockitem/").status_code == 200
    assert viewer.post("/admin/inventory/stockitem/1/change/", {"on_hand": "1"}).status_code == 403


# --- Stock --------------------------------------------------------------------------------------


def stock_form(admin_client, sku: str = "SKU-MUG") -> tuple[str, dict]:
    item = StockItem.objects.using("inventory").get(sku=sku)
    url = f"/admin/inventory/stockitem/{item.pk}/change/"
    page = admin_client.get(url)
    assert page.status_code == 200
    loaded = re.search(rb'name="loaded_version" value="(\d+)"', page.content)
    assert loaded, "the form carries the version it was loaded at"
    return url, {"on_hand": str(item.on_hand), "loaded_version": loaded.group(1).decode()}


def test_stock_edit_bumps_the_version(admin_client, catalogue):
    url, form = stock_form(admin_client)
    version = StockItem.objects.using("inventory").get(sku="SKU-MUG").version

    assert admin_client.post(url, {**form, "on_hand": "80"}).status_code == 302

    item = StockItem.objects.using("inventory").get(sku="SKU-MUG")
    assert (item.on_hand, item.version) == (80, version + 1)


def test_a_concurrent_stock_change_refuses_the_edit_and_writes_nothing(admin_client, catalogue):
    url, form = stock_form(admin_client)
    inventory.stock_reserve_line(sku="SKU-MUG", quantity=3)  # a saga reserves meanwhile
    underneath = StockItem.objects.using("inventory").values("on_hand", "reserved", "version").get(sku="SKU-MUG")

    response = admin_client.post(url, {**form, "on_hand": "80"})

    assert response.status_code == 200
    assert "This stock changed while you were editing it" in response.content.decode()
    assert (
        StockItem.objects.using("inventory").values("on_hand", "reserved", "version").get(sku="SKU-MUG") == underneath
    )
    # Another operator's save in between is refused the same way.
    url, form = stock_form(admin_client)
    StockItem.objects.using("inventory").filter(sku="SKU-MUG").update(version=F("version") + 1)
    assert admin_client.post(url, {**form, "on_hand": "70"}).status_code == 200
    assert StockItem.objects.using("inventory").get(sku="SKU-MUG").on_hand == 50


def test_on_hand_cannot_drop_below_what_is_reserved(admin_client, catalogue):
    inventory.stock_reserve_line(sku="SKU-MUG", quantity=5)
    url, form = stock_form(admin_client)

    response = admin_client.post(url, {**form, "on_hand": "3"})

    assert response.status_code == 200
    assert "5 units of SKU-MUG are reserved" in response.content.decode()
    assert mug() == (50, 5)
    assert admin_client.post(url, {**form, "on_hand": "5"}).status_code == 302
    assert mug() == (5, 5)


def test_a_new_sku_is_added_with_its_count(admin_client):
    response = admin_client.post("/admin/inventory/stockitem/add/", {"sku": "SKU-PEN", "on_hand": "12"})

    assert response.status_code == 302
    item = StockItem.objects.using("inventory").get(sku="SKU-PEN")
    assert (item.on_hand, item.reserved, item.version) == (12, 0, 0)
