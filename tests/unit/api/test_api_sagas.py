"""The operators' saga API: the list with its filters and pagination, the detail, and cancel."""

from __future__ import annotations

import uuid
from datetime import timedelta

import pytest
from django.utils import timezone

from orchestration.models import Saga, SagaEvent, SagaStep
from orders.models import Order
from tests.conftest import deliver_until, mug, order_body

pytestmark = pytest.mark.django_db(databases="__all__")

URL = "/api/sagas/"


def make_saga(
    *, state: str = "running", definition: str = "place_order", age: float = 0, order_id=None, steps=()
) -> Saga:
    """A saga row as the engine leaves it. `steps`: (name, state, lease in s from now or None,
    next attempt in s from now or None)."""
    now = timezone.now()
    saga = Saga.objects.create(definition=definition, context={"order_id": str(order_id or uuid.uuid4())})
    # `state` is a protected FSM field: set it as the engine's conditional updates do.
    Saga.objects.filter(id=saga.id).update(state=state, created_at=now - timedelta(seconds=age))
    for position, (name, step_state, lease, next_attempt) in enumerate(steps):
        step = SagaStep.objects.create(saga=saga, name=name, position=position, service="inventory")
        SagaStep.objects.filter(id=step.id).update(
            state=step_state,
            deadline_at=now + timedelta(seconds=lease) if lease is not None else None,
            next_attempt_at=now + timedelta(seconds=next_attempt) if next_attempt is not None else None,
        )
    return Saga.objects.get(id=saga.id)


def ids(response) -> list[str]:
    assert response.status_code == 200, response.content
    return [saga["id"] for saga in response.json()["results"]]


def listed(api, query: str = "") -> list[str]:
    return ids(api.get(f"{URL}?{query}"))


# --- the list -------------------------------------------------------------------------------------


def test_the_list_is_paginated_newest_first(operator_api):
    sagas = [make_saga(age=age) for age in (50, 40, 30, 20, 10)]
    newest_first = [str(s.id) for s in reversed(sagas)]

    first = operator_api.get(f"{URL}?page_size=2")
    last = operator_api.get(f"{URL}?page_size=2&page=3")

    assert first.json()["count"] == 5
    assert ids(first) == newest_first[:2]
    assert first.json()["previous"] is None
    assert first.json()["next"].endswith("/api/sagas/?page=2&page_size=2")
    assert ids(last) == newest_first[4:]
    assert last.json()["next"] is None


@pytest.mark.parametrize("query", ["page=0", "page=-1", "page=abc", "page=1.5", "page_size=0", "page_size=x"])
def test_a_malformed_page_is_a_400(operator_api, query):
    response = operator_api.get(f"{URL}?{query}")

    assert response.status_code == 400
    assert response.json()["code"] == "invalid_request"
    assert query.split("=")[0] in response.json()["details"]


def test_a_page_past_the_last_is_a_404(operator_api):
    make_saga()

    response = operator_api.get(f"{URL}?page=2")

    assert (response.status_code, response.json()["code"]) == (404, "not_found")


def test_the_page_size_is_50_by_default_and_200_at_most(operator_api):
    Saga.objects.bulk_create([Saga(definition="place_order") for _ in range(201)])

    assert len(listed(operator_api)) == 50
    assert len(listed(operator_api, "page_size=200")) == 200
    # Above the maximum is refused as the schema says, not silently clamped.
    assert operator_api.get(f"{URL}?page_size=1000").status_code == 400


def test_the_list_shows_style_order_and_what_needs_an_operator(operator_api):
    order_id = uuid.uuid4()
    saga = make_saga(state="parked", definition="place_order_tcc", order_id=order_id)

    (row,) = operator_api.get(URL).json()["results"]

    assert row == {
        "id": str(saga.id),
        "definition": "place_order_tcc",
        "definition_version": "",  # a saga made by hand, without a recorded version
        "definition_hash": "",
        "style": "tcc",
        "order_id": str(order_id),
        "state": "parked",
        "stuck": True,
        "retrying": False,
        "failure": None,
        "version": 0,
        "created_at": row["created_at"],
        "finished_at": None,
    }


def test_filter_by_state(operator_api):
    running, parked, failed = make_saga(state="running"), make_saga(state="parked"), make_saga(state="failed")
    make_saga(state="completed")

    assert listed(operator_api, "state=parked") == [str(parked.id)]
    assert set(listed(operator_api, "state=parked&state=failed&state=running")) == {
        str(running.id),
        str(parked.id),
        str(failed.id),
    }


def test_an_unknown_state_is_a_400(operator_api):
    response = operator_api.get(f"{URL}?state=exploded")

    assert response.status_code == 400
    assert "state" in response.json()["details"]


@pytest.fixture
def stuck_and_not() -> dict[str, Saga]:
    return {
        "lease passed": make_saga(steps=[("reserve_stock", "running", -5, None)]),
        "parked": make_saga(state="parked", steps=[("reserve_stock", "compensation_failed", None, None)]),
        "compensation lease passed": make_saga(
            state="compensating", steps=[("reserve_stock", "compensating", -1, None)]
        ),
        # Not stuck:
        "lease running": make_saga(steps=[("reserve_stock", "running", 30, None)]),
        "ended with an old lease": make_saga(state="completed", steps=[("reserve_stock", "running", -5, None)]),
        "succeeded step": make_saga(steps=[("reserve_stock", "succeeded", -5, None)]),
    }


def test_stuck_sagas_are_parked_or_past_a_lease(operator_api, stuck_and_not):
    stuck = {str(stuck_and_not[k].id) for k in ("lease passed", "parked", "compensation lease passed")}
    others = {str(s.id) for s in stuck_and_not.values()} - stuck

    assert set(listed(operator_api, "state=stuck")) == stuck
    assert set(listed(operator_api, "stuck=true")) == stuck
    assert set(listed(operator_api, "stuck=false")) == others
    assert {row["id"] for row in operator_api.get(URL).json()["results"] if row["stuck"]} == stuck


def test_retrying_sagas_have_a_step_waiting_out_a_backoff(operator_api):
    retrying = make_saga(steps=[("reserve_stock", "succeeded", None, None), ("charge_payment", "retrying", 40, 5)])
    compensation_retrying = make_saga(state="compensating", steps=[("charge_payment", "compensating", 40, 5)])
    make_saga(state="compensating", steps=[("charge_payment", "compensating", 30, None)])  # in flight, no backoff
    make_saga(state="failed", steps=[("charge_payment", "retrying", None, 5)])  # ended

    assert set(listed(operator_api, "state=retrying")) == {str(retrying.id), str(compensation_retrying.id)}


def test_state_and_pseudo_states_combine(operator_api):
    parked, completed = make_saga(state="parked"), make_saga(state="completed")
    retrying = make_saga(steps=[("charge_payment", "retrying", 40, 5)])

    assert set(listed(operator_api, "state=completed&state=retrying")) == {str(completed.id), str(retrying.id)}
    assert listed(operator_api, "state=retrying&stuck=true") == []
    assert listed(operator_api, "state=parked&stuck=true") == [str(parked.id)]


def test_filter_by_style_and_definition(operator_api):
    by_definition = {
        name: make_saga(definition=name)
        for name in ("place_order", "place_order_parallel", "place_order_tcc", "place_order_choreography")
    }

    assert listed(operator_api, "style=tcc") == [str(by_definition["place_order_tcc"].id)]
    assert set(listed(operator_api, "style=orchestrated&style=choreography")) == {
        str(by_definition["place_order"].id),
        str(by_definition["place_order_choreography"].id),
    }
    assert listed(operator_api, "definition=place_order_parallel") == [str(by_definition["place_order_parallel"].id)]
    assert operator_api.get(f"{URL}?style=two_phase_commit").status_code == 400


def test_filter_by_order(operator_api):
    order_id = uuid.uuid4()
    mine = make_saga(order_id=order_id)
    make_saga()

    assert listed(operator_api, f"order_id={order_id}") == [str(mine.id)]
    assert listed(operator_api, f"order_id={uuid.uuid4()}") == []
    assert operator_api.get(f"{URL}?order_id=not-a-uuid").status_code == 400


def test_filter_by_age(operator_api):
    hour_old, minute_old, new = make_saga(age=3600), make_saga(age=60), make_saga(age=1)

    assert set(listed(operator_api, "older_than=30")) == {str(hour_old.id), str(minute_old.id)}
    assert listed(operator_api, "older_than=600") == [str(hour_old.id)]
    assert set(listed(operator_api, "newer_than=600")) == {str(minute_old.id), str(new.id)}
    assert listed(operator_api, "newer_than=600&older_than=30") == [str(minute_old.id)]
    cutoff = (timezone.now() - timedelta(seconds=600)).isoformat()
    assert operator_api.get(URL, {"created_before": cutoff}).json()["count"] == 1
    assert operator_api.get(URL, {"created_after": cutoff}).json()["count"] == 2


@pytest.mark.parametrize(
    "query",
    [
        "older_than=-1",
        "older_than=abc",
        "newer_than=1e99",
        "older_than=99999999999",
        "created_after=yesterday",
        "created_before=9999-12-31T23:59:59-01:00",
        "stuck=maybe",
    ],
)
def test_a_malformed_filter_is_a_400(operator_api, query):
    response = operator_api.get(f"{URL}?{query}")

    assert response.status_code == 400
    assert query.split("=")[0] in response.json()["details"]


def test_an_offset_postgresql_would_refuse_is_turned_to_utc_first(operator_api):
    saga = make_saga(age=3600)

    # +23:00 is a valid ISO 8601 offset that PostgreSQL refuses (it stops at 15:59).
    assert listed(operator_api, "created_after=2000-01-01T00:00:00%2B23:00") == [str(saga.id)]


# --- the detail -----------------------------------------------------------------------------------


@pytest.mark.django_db(transaction=True, databases="__all__")
def test_the_detail_has_steps_in_definition_order_and_the_timeline(alice_api, operator_api, catalogue, broker):
    receipt = alice_api.post("/api/orders/", order_body(token="tok_declined"), format="json").json()
    broker.deliver()

    detail = operator_api.get(f"{URL}{receipt['saga']['id']}/").json()

    assert (detail["state"], detail["style"], detail["order_id"]) == ("compensated", "orchestrated", receipt["id"])
    assert detail["failure"]["code"] == "card_declined"
    assert [s["name"] for s in detail["steps"]][:2] == ["reserve_stock", "charge_payment"]
    assert {s["name"]: s["state"] for s in detail["steps"]}["charge_payment"] == "failed"
    events = SagaEvent.objects.filter(saga_id=receipt["saga"]["id"]).order_by("seq")
    assert [e["seq"] for e in detail["events"]] == list(events.values_list("seq", flat=True))
    assert detail["events"][0]["kind"] == events[0].kind
    assert detail["context"]["order_id"] == receipt["id"]
    assert detail["stuck"] is detail["retrying"] is False


def test_an_unknown_saga_is_a_404(operator_api):
    assert operator_api.get(f"{URL}{uuid.uuid4()}/").json()["code"] == "not_found"
    assert operator_api.get(f"{URL}not-a-uuid/").status_code == 404


# --- cancel by an operator ------------------------------------------------------------------------


@pytest.mark.django_db(transaction=True, databases="__all__")
def test_an_operator_cancels_a_running_saga_and_its_order_follows(alice_api, operator_api, catalogue, broker):
    receipt = alice_api.post("/api/orders/", order_body(), format="json").json()
    deliver_until(broker, "orders.execute")  # stock reserved and card charged
    url = f"{URL}{receipt['saga']['id']}/cancel/"

    response = operator_api.post(url, {"reason": "fraud suspected, ticket 7"}, format="json")

    assert response.status_code == 202, response.content
    assert (response.json()["state"], response.json()["order_id"]) == ("compensating", receipt["id"])
    broker.deliver()
    assert Saga.objects.get(id=receipt["saga"]["id"]).state == "cancelled"
    order = Order.objects.using("orders").get(id=receipt["id"])
    assert (order.status, order.failure_code, order.failure_message) == (
        "cancelled",
        "cancelled",
        "fraud suspected, ticket 7",
    )
    assert mug() == (50, 0)
    requested = SagaEvent.objects.get(saga_id=receipt["saga"]["id"], kind="saga_cancel_requested")
    assert (requested.actor, requested.data["reason"]) == ("user:ops", "fraud suspected, ticket 7")
    # Once it ended, a second cancel is refused.
    again = operator_api.post(url, {"reason": "again"}, format="json")
    assert (again.status_code, again.json()["code"]) == (409, "already_cancelled")


@pytest.mark.django_db(transaction=True, databases="__all__")
def test_an_operator_cannot_cancel_a_shipped_order(alice_api, operator_api, catalogue, broker):
    receipt = alice_api.post("/api/orders/", order_body(), format="json").json()
    broker.deliver()
    before = Saga.objects.get(id=receipt["saga"]["id"])

    response = operator_api.post(f"{URL}{before.id}/cancel/", {"reason": "too late"}, format="json")

    assert (response.status_code, response.json()["code"]) == (409, "not_cancellable")
    after = Saga.objects.get(id=before.id)
    assert (after.state, after.version) == ("completed", before.version)
    assert Order.objects.using("orders").get(id=receipt["id"]).status == "shipped"


@pytest.mark.parametrize("body", [{}, {"reason": ""}, {"reason": "   "}, {"reason": "x" * 501}])
def test_an_operator_cancel_needs_a_reason(operator_api, body):
    saga = make_saga()

    response = operator_api.post(f"{URL}{saga.id}/cancel/", body, format="json")

    assert (response.status_code, response.json()["code"]) == (400, "invalid_request")
    assert "reason" in response.json()["details"]
    assert Saga.objects.get(id=saga.id).state == "running"


def test_cancelling_an_unknown_saga_is_a_404(operator_api):
    response = operator_api.post(f"{URL}{uuid.uuid4()}/cancel/", {"reason": "x"}, format="json")

    assert (response.status_code, response.json()["code"]) == (404, "not_found")


@pytest.mark.parametrize("reason", ["", "   "])
def test_a_skip_needs_a_reason(operator_api, reason):
    saga = make_saga(state="parked", steps=[("charge_payment", "compensation_failed", None, None)])

    response = operator_api.post(f"{URL}{saga.id}/skip/", {"step": "charge_payment", "reason": reason}, format="json")

    assert response.status_code == 400
    assert "reason" in response.json()["details"]
    assert SagaStep.objects.get(saga=saga).state == "compensation_failed"
    assert not SagaEvent.objects.filter(saga=saga).exists()
