"""Every transaction style with a real worker process on Redis and PostgreSQL: the happy path,
a declined card, and a cancel racing the flow or landing in the handling window."""

from __future__ import annotations

import pytest

from orchestration.audit import run_audit
from orders.models import Order
from payments.models import Charge
from tests.conftest import order_body
from tests.processes import Worker, flush_broker, wait_for, wait_until_quiet

pytestmark = [pytest.mark.production, pytest.mark.django_db(transaction=True, databases="__all__")]

MODES = ["orchestrated", "parallel", "tcc", "choreography"]
AT_REST = {"completed", "compensated", "cancelled", "failed", "parked"}


@pytest.fixture(scope="module")
def worker(django_db_setup, django_db_blocker):
    flush_broker()
    # A short handling window, to cancel in.
    process = Worker(name="styles", concurrency=3, extra_env={"SHIPPING_HANDLING_SECONDS": "2"}).start()
    yield process
    process.stop()


@pytest.fixture(autouse=True)
def settle_before_flush(worker):
    yield
    wait_until_quiet()


def place(api, mode: str, **kwargs) -> dict:
    response = api.post("/api/orders/", {**order_body(**kwargs), "mode": mode}, format="json")
    assert response.status_code == 202, response.content
    return response.json()


def settle(api, receipt: dict, timeout: float = 40) -> dict:
    def done():
        detail = api.get(receipt["url"]).json()
        return detail if detail["saga"]["state"] in AT_REST else None

    return wait_for(done, timeout=timeout, interval=0.2, message=f"order {receipt['id']} to settle")


@pytest.mark.parametrize("mode", MODES)
def test_each_style_completes_and_a_declined_card_compensates(worker, alice_api, catalogue, mode):
    ok = place(alice_api, mode)
    declined = place(alice_api, mode, token="tok_declined")

    done, failed = settle(alice_api, ok), settle(alice_api, declined)

    assert done["saga"]["state"] == "completed"
    assert done["status"] == ("approved" if mode == "tcc" else "shipped")
    assert (failed["saga"]["state"], failed["status"]) == ("compensated", "rejected")
    assert failed["failure"]["code"] == "card_declined"
    assert run_audit() == []


@pytest.mark.parametrize("mode", MODES)
def test_a_cancel_racing_the_flow_ends_consistent(worker, alice_api, catalogue, mode):
    receipt = place(alice_api, mode)
    response = alice_api.post(f"{receipt['url']}cancel/", {}, format="json")
    assert response.status_code in (202, 409), response.content

    detail = settle(alice_api, receipt)

    if response.status_code == 202:
        assert (detail["saga"]["state"], detail["status"]) == ("cancelled", "cancelled")
        assert not Charge.objects.using("payments").filter(state__in=["captured", "authorized"]).exists()
    else:
        assert detail["saga"]["state"] == "completed"
    assert run_audit() == []


@pytest.mark.parametrize("mode", ["orchestrated", "parallel", "choreography"])
def test_cancel_in_the_handling_window(worker, alice_api, catalogue, mode):
    receipt = place(alice_api, mode)

    def booked():
        steps = {s["name"]: s["state"] for s in alice_api.get(receipt["url"]).json()["saga"]["steps"]}
        return steps.get("schedule_shipment") == "succeeded"

    wait_for(booked, timeout=30, message="the parcel to be booked")
    response = alice_api.post(f"{receipt['url']}cancel/", {"reason": "found it cheaper"}, format="json")
    assert response.status_code == 202, response.content

    detail = settle(alice_api, receipt)

    assert (detail["saga"]["state"], detail["status"]) == ("cancelled", "cancelled")
    assert Order.objects.using("orders").get(id=receipt["id"]).failure_message == "found it cheaper"
    assert Charge.objects.using("payments").get(saga_id=receipt["saga"]["id"]).state == "refunded"
    assert run_audit() == []
