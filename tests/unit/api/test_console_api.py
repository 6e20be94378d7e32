"""The operator console's API: search over the whole history, bulk actions (with their preview,
their audit and their safety under concurrency), export, saved views, and bad input."""

from __future__ import annotations

import csv
import io
import threading
import uuid
from datetime import timedelta

import pytest
from django.db import connections
from django.utils import timezone
from rest_framework.test import APIClient

from orchestration import engine
from orchestration.models import Saga, SagaEvent, SagaStep, SavedView
from tests.conftest import ON_POSTGRES, make_operator, make_user

pytestmark = pytest.mark.django_db(databases="__all__", transaction=False)

URL = "/api/sagas/"


def context(*, email="alice@example.com", customer_id=7, skus=("SKU-MUG",), token=None) -> dict:
    # A saga's context carries the card's reference (payments keeps the token); `token` puts a raw
    # one in as well, as a context from an older release or a careless definition might.
    secret = {"payment_token": token} if token else {}
    return {
        **secret,
        "order_id": str(uuid.uuid4()),
        "customer_id": customer_id,
        "customer_email": email,
        "items": [{"sku": sku, "quantity": 1} for sku in skus],
        "amount": "12.50",
        "currency": "EUR",
        "payment_method": "pm_" + uuid.uuid4().hex,
        "shipping_address": {"name": "A", "line1": "1 rue", "city": "Paris", "postal_code": "75001", "country": "FR"},
        "mode": "orchestrated",
    }


def started(definition="place_order", **kwargs) -> Saga:
    saga_id = uuid.uuid4()
    engine.saga_start(saga_id=saga_id, definition=definition, context=context(**kwargs))
    return Saga.objects.get(id=saga_id)


def park(saga: Saga, *, step="reserve_stock", step_state="failed", failure=None) -> Saga:
    """Leave the saga parked as the engine does when a step keeps failing."""
    Saga.objects.filter(id=saga.id).update(state="parked", failure=failure)
    SagaStep.objects.filter(saga=saga, name=step).update(
        state=step_state, deadline_at=None, error={"code": "gateway_timeout", "message": "Gateway timeout"}
    )
    return Saga.objects.get(id=saga.id)


def ids(response) -> list[str]:
    assert response.status_code == 200, response.content
    return [s["id"] for s in response.json()["results"]]


@pytest.fixture
def staff_api():
    client = APIClient()
    client.force_authenticate(make_user("watcher", staff=True))
    return client


# --- search ---------------------------------------------------------------------------------------


def test_search_finds_old_and_finished_sagas_by_id_order_customer_and_sku(operator_api, broker):
    target = started(email="Carol@Example.com", customer_id=42, skus=("SKU-LAMP", "SKU-BOOK"))
    others = [started() for _ in range(3)]
    # Old and finished: not in the live feed's snapshot, still found.
    Saga.objects.filter(id=target.id).update(state="completed", created_at=timezone.now() - timedelta(days=90))

    def found(query):
        return ids(operator_api.get(f"{URL}?{query}"))

    assert found(f"q={target.id}") == [str(target.id)]
    assert found(f"q={target.context['order_id']}") == [str(target.id)]
    assert found("q=carol@example.COM") == [str(target.id)]
    assert found("customer=42") == [str(target.id)]
    assert found("q=SKU-LAMP") == [str(target.id)]
    assert found("sku=SKU-BOOK") == [str(target.id)]
    assert set(found("sku=SKU-MUG")) == {str(s.id) for s in others}
    assert found("sku=SKU-NONE") == []


def test_search_by_failure_code_step_and_time_range(operator_api, broker):
    declined = park(started(), step="charge_payment", failure={"code": "card_declined", "message": "Declined"})
    timed_out = park(started(), step="reserve_stock", failure={"code": "retries_exhausted", "message": "x"})
    fine = started()
    Saga.objects.filter(id=fine.id).update(created_at=timezone.now() - timedelta(hours=3))

    def found(query):
        return set(ids(operator_api.get(f"{URL}?{query}")))

    assert found("failure_code=card_declined") == {str(declined.id)}
    assert found("step=charge_payment") == {str(declined.id)}
    assert found("step=charge_payment&step_state=failed") == {str(declined.id)}
    assert found("step=reserve_stock&step_state=failed") == {str(timed_out.id)}
    assert found("step_state=failed") == {str(declined.id), str(timed_out.id)}  # any step
    since = (timezone.now() - timedelta(hours=1)).isoformat()
    assert found(f"created_after={since.replace('+', '%2B')}") == {str(declined.id), str(timed_out.id)}
    before = (timezone.now() - timedelta(hours=2)).isoformat()
    assert found(f"created_before={before.replace('+', '%2B')}") == {str(fine.id)}


def test_search_answers_the_live_feed_shape_paginated(staff_api, broker):
    for _ in range(3):
        started()

    page = staff_api.get(f"{URL}search/?page_size=2")

    assert page.status_code == 200
    body = page.json()
    assert body["count"] == 3
    assert len(body["results"]) == 2
    assert body["next"]
    header = body["results"][0]
    assert {"id", "state", "version", "steps_done", "steps_total", "active_step", "stuck", "style"} <= set(header)
    assert header["active_step"] == "reserve_stock"


@pytest.mark.parametrize(
    ("query", "field"),
    [
        ("created_after=yesterday", "created_after"),
        ("created_before=2026-13-45T00:00:00Z", "created_before"),
        ("state=exploded", "state"),
        ("step=no_such_step", "step"),
        ("step_state=exploded", "step_state"),
        ("order_id=not-a-uuid", "order_id"),
        ("q=" + "x" * 201, "q"),
        ("page=0", "page"),
    ],
)
@pytest.mark.parametrize("path", ["", "search/", "export.csv"])
def test_malformed_filters_are_a_400_naming_the_filter(operator_api, query, field, path):
    response = operator_api.get(f"{URL}{path}?{query}")

    if path == "export.csv" and field == "page":
        assert response.status_code == 200  # the CSV has every page
        return
    assert response.status_code == 400, response.content
    body = response.json()
    assert body["code"] == "invalid_request"
    assert body["message"]
    assert field in body["details"]


def test_search_and_export_are_for_staff_only(alice_api):
    for path in ("search/", "export.csv", f"{uuid.uuid4()}/export/", "views/"):
        assert alice_api.get(f"{URL}{path}").status_code == 403


# --- bulk -----------------------------------------------------------------------------------------


def bulk(api, **body):
    return api.post(f"{URL}bulk/", body, format="json")


def test_bulk_preview_says_which_are_eligible_and_why_not(operator_api, broker):
    parked = [park(started()) for _ in range(3)]
    running = started()
    done = started()
    Saga.objects.filter(id=done.id).update(state="completed")
    chosen = [str(s.id) for s in (*parked, running, done)] + [str(uuid.uuid4())]

    response = bulk(operator_api, action="retry", ids=chosen, dry_run=True)

    assert response.status_code == 200, response.content
    body = response.json()
    assert body["count"] == 6
    assert body["eligible"] == [str(s.id) for s in parked]
    refused = {r["id"]: r["code"] for r in body["ineligible"]}
    assert refused == {
        str(running.id): "saga_not_stuck",
        str(done.id): "saga_not_retryable",
        chosen[-1]: "not_found",
    }
    # Nothing changed.
    assert Saga.objects.filter(state="parked").count() == 3
    assert not SagaEvent.objects.filter(kind="operator_retry").exists()


def test_bulk_retry_of_50_parked_sagas_is_audited_per_saga(operator_api, operator, broker):
    parked = [park(started()) for _ in range(50)]

    preview = bulk(operator_api, action="retry", filter="state=parked", dry_run=True).json()
    assert len(preview["eligible"]) == 50
    response = bulk(operator_api, action="retry", ids=preview["eligible"], reason="gateway back up")

    body = response.json()
    assert response.status_code == 200, body
    assert (body["count"], body["succeeded"], body["refused"]) == (50, 50, 0)
    assert {r["id"] for r in body["results"]} == {str(s.id) for s in parked}
    assert all(r["ok"] and r["state"] == "running" for r in body["results"])
    events = SagaEvent.objects.filter(kind="operator_retry")
    assert events.count() == 50
    assert {e.actor for e in events} == {f"user:{operator.get_username()}"}
    assert {e.data["reason"] for e in events} == {"gateway back up"}
    assert not Saga.objects.filter(state="parked").exists()


def test_bulk_over_sagas_that_changed_meanwhile_reports_each_outcome(operator_api, broker):
    parked = [park(started()) for _ in range(4)]
    preview = bulk(operator_api, action="retry", ids=[str(s.id) for s in parked], dry_run=True).json()
    # Another operator retries two of them before this one confirms.
    for saga in parked[:2]:
        engine.saga_retry(saga_id=saga.id, actor="user:other", reason="first")

    body = bulk(operator_api, action="retry", ids=preview["eligible"], reason="second").json()

    outcome = {r["id"]: (r["ok"], r["code"]) for r in body["results"]}
    assert outcome == {
        str(parked[0].id): (False, "saga_not_stuck"),
        str(parked[1].id): (False, "saga_not_stuck"),
        str(parked[2].id): (True, "accepted"),
        str(parked[3].id): (True, "accepted"),
    }
    for saga in parked:
        assert SagaEvent.objects.filter(saga=saga, kind="operator_retry").count() == 1


def test_bulk_cancel_and_skip(operator_api, broker):
    running = [started() for _ in range(2)]
    given_up = park(started(), step="reserve_stock", step_state="compensation_failed", failure={"code": "x"})

    cancelled = bulk(operator_api, action="cancel", ids=[str(s.id) for s in running], reason="fraud wave")
    skipped = bulk(operator_api, action="skip", ids=[str(given_up.id)], reason="released by hand")

    assert cancelled.json()["succeeded"] == 2, cancelled.content
    assert all(Saga.objects.get(id=s.id).state == "compensating" for s in running)
    assert skipped.json()["succeeded"] == 1, skipped.content
    assert SagaStep.objects.get(saga=given_up, name="reserve_stock").state == "skipped"
    assert SagaEvent.objects.filter(saga=given_up, kind="compensation_skipped", data__reason="released by hand")


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"action": "explode", "ids": [str(uuid.uuid4())]}, "action"),
        ({"action": "retry", "ids": ["not-a-uuid"]}, "ids"),
        ({"action": "retry", "ids": []}, "ids"),
        ({"action": "retry", "ids": [str(uuid.uuid4())] * 501}, "ids"),
        ({"action": "retry", "filter": "state=exploded"}, "filter"),
        ({"action": "retry", "filter": "created_after=soon"}, "filter"),
        ({"action": "retry", "ids": [str(uuid.uuid4())], "dry_run": "perhaps"}, "dry_run"),
        ({"action": "skip", "ids": [str(uuid.uuid4())], "reason": "r", "step": "nope"}, "step"),
    ],
)
def test_bulk_bad_input_is_a_400(operator_api, body, field):
    response = bulk(operator_api, **body)

    assert response.status_code == 400, response.content
    assert response.json()["code"] == "invalid_request"
    assert field in response.json()["details"]


def test_bulk_targets_ids_a_filter_both_or_nothing(operator_api, broker):
    parked = [park(started()) for _ in range(2)]
    running = started()
    chosen = [str(s.id) for s in (*parked, running)]

    def eligible(**target):
        response = bulk(operator_api, action="retry", dry_run=True, **target)
        assert response.status_code == 200, response.content
        return response.json()

    assert eligible(ids=chosen)["count"] == 3
    assert eligible(filter="state=parked")["eligible"] == [str(s.id) for s in reversed(parked)]  # newest first
    both = eligible(ids=chosen, filter="state=parked")  # the chosen ones that still match
    assert (both["count"], set(both["eligible"])) == (2, {str(s.id) for s in parked})
    assert eligible() == {"action": "retry", "dry_run": True, "count": 0, "eligible": [], "ineligible": []}


def test_a_bulk_skip_without_a_reason_is_refused_per_saga_and_a_cancel_gets_one(operator_api, broker):
    given_up = park(started(), step="reserve_stock", step_state="compensation_failed", failure={"code": "x"})
    running = started()

    skipped = bulk(operator_api, action="skip", ids=[str(given_up.id)], reason=" ").json()
    cancelled = bulk(operator_api, action="cancel", ids=[str(running.id)]).json()

    assert [(r["ok"], r["code"]) for r in skipped["results"]] == [(False, "reason_required")]
    assert SagaStep.objects.get(saga=given_up, name="reserve_stock").state == "compensation_failed"
    assert cancelled["succeeded"] == 1
    assert Saga.objects.get(id=running.id).failure["message"] == "Cancelled by an operator"


def test_bulk_needs_the_operate_permission(staff_api):
    assert bulk(staff_api, action="retry", ids=[str(uuid.uuid4())]).status_code == 403


@pytest.mark.skipif(not ON_POSTGRES, reason="two transactions at once need PostgreSQL")
@pytest.mark.django_db(databases="__all__", transaction=True)
def test_concurrent_bulk_retries_apply_each_saga_once(broker):
    parked = [str(park(started()).id) for _ in range(20)]
    operators = [make_operator("ops-a"), make_operator("ops-b")]
    answers: list[dict] = [{}, {}]
    barrier = threading.Barrier(2)

    def run(i):
        try:
            client = APIClient()
            client.force_authenticate(operators[i])
            barrier.wait()
            # One goes forwards, the other backwards: they meet in the middle.
            chosen = parked if i == 0 else list(reversed(parked))
            answers[i] = client.post(f"{URL}bulk/", {"action": "retry", "ids": chosen}, format="json").json()
        finally:
            connections.close_all()

    threads = [threading.Thread(target=run, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()

    outcomes = {saga_id: [] for saga_id in parked}
    for answer in answers:
        assert answer["count"] == 20, answer
        for result in answer["results"]:
            outcomes[result["id"]].append(result["ok"])
    # Each saga: accepted by exactly one operator, refused (with a reason) to the other.
    assert all(sorted(o) == [False, True] for o in outcomes.values()), outcomes
    for saga_id in parked:
        assert SagaEvent.objects.filter(saga_id=saga_id, kind="operator_retry").count() == 1
    refused = [r for a in answers for r in a["results"] if not r["ok"]]
    assert {r["code"] for r in refused} == {"saga_not_stuck"}


# --- export ---------------------------------------------------------------------------------------


def test_export_a_saga_with_step_inputs_masked(staff_api, broker):
    saga = park(started(token="tok_live_secret_9876"))

    response = staff_api.get(f"{URL}{saga.id}/export/?download=1")

    assert response.status_code == 200
    assert response["Content-Disposition"] == f'attachment; filename="saga-{saga.id}.json"'
    body = response.json()
    assert body["saga"]["id"] == str(saga.id)
    assert "tok_live_secret_9876" not in response.content.decode()
    steps = {s["name"]: s for s in body["steps"]}
    assert body["saga"]["context"]["payment_token"] == "••••9876"
    assert steps["charge_payment"]["input"]["payment_method"] == saga.context["payment_method"]
    assert steps["charge_payment"]["input"]["amount"] == "12.50"
    assert steps["reserve_stock"]["input"]["items"] == [{"sku": "SKU-MUG", "quantity": 1}]
    assert steps["reserve_stock"]["error"] == {"code": "gateway_timeout", "message": "Gateway timeout"}
    assert [e["kind"] for e in steps["reserve_stock"]["history"]] == ["step_started"]
    assert [e["seq"] for e in body["events"]] == list(range(1, len(body["events"]) + 1))


def test_export_an_unknown_saga_is_a_404(staff_api):
    response = staff_api.get(f"{URL}{uuid.uuid4()}/export/")

    assert (response.status_code, response.json()["code"]) == (404, "not_found")


def test_export_the_filtered_list_as_csv(staff_api, broker):
    declined = park(started(skus=("SKU-MUG", "SKU-BOOK")), failure={"code": "card_declined", "message": "=cmd()"})
    started()

    response = staff_api.get(f"{URL}export.csv?failure_code=card_declined")

    assert response.status_code == 200
    assert response["Content-Type"].startswith("text/csv")
    rows = list(csv.DictReader(io.StringIO(b"".join(response.streaming_content).decode())))
    assert len(rows) == 1
    row = rows[0]
    assert (row["id"], row["state"], row["failure_code"], row["skus"]) == (
        str(declined.id),
        "parked",
        "card_declined",
        "SKU-MUG SKU-BOOK",
    )
    assert row["failure_message"] == "'=cmd()"  # never a formula in a spreadsheet


# --- saved views ----------------------------------------------------------------------------------


def test_saved_views_are_per_user(staff_api, operator_api):
    created = staff_api.post(f"{URL}views/", {"name": "parked", "query": "?state=parked"}, format="json")
    assert created.status_code == 201, created.content
    assert created.json()["query"] == "state=parked"

    assert [v["name"] for v in staff_api.get(f"{URL}views/").json()] == ["parked"]
    assert operator_api.get(f"{URL}views/").json() == []
    assert operator_api.delete(f"{URL}views/{created.json()['id']}/").status_code == 404

    again = staff_api.post(f"{URL}views/", {"name": "parked", "query": ""}, format="json")
    assert (again.status_code, again.json()["code"]) == (409, "view_exists")
    bad = staff_api.post(f"{URL}views/", {"name": "x", "query": "state=exploded"}, format="json")
    assert bad.status_code == 400
    assert "query" in bad.json()["details"]
    assert staff_api.delete(f"{URL}views/{created.json()['id']}/").status_code == 204
    assert not SavedView.objects.exists()
