"""Retention of finished sagas (`orchestration/retention.py`, `manage.py purge_sagas`, beat's
`orchestration.purge_sagas`): the step-level timeline of sagas that ended long ago goes, in
bounded batches; sagas in flight or parked, saga-level and operators' events, the sagas and their
steps stay, and the audit still passes."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta

import pytest
from django.conf import settings
from django.core.management import call_command
from django.core.management.base import CommandError
from django.db import connections, transaction
from django.db.models import F, Max

from orchestration import retention
from orchestration import tasks as orchestration_tasks
from orchestration.audit import run_audit
from orchestration.models import Saga, SagaEvent, SagaStep
from tests.conftest import deliver_until, order_body

pytestmark = pytest.mark.django_db(transaction=True, databases="__all__")


def place(api, **kwargs) -> str:
    response = api.post("/api/orders/", order_body(**kwargs), format="json")
    assert response.status_code == 202, response.content
    return response.json()["saga"]["id"]


def ended_ago(saga_id: str, *, days: float) -> None:
    Saga.objects.filter(id=saga_id).update(finished_at=F("finished_at") - timedelta(days=days))


def step_events(saga_id: str) -> int:
    return SagaEvent.objects.filter(saga_id=saga_id).exclude(step="").count()


def saga_events(saga_id: str) -> int:
    return SagaEvent.objects.filter(saga_id=saga_id, step="").count()


@pytest.fixture
def history(alice_api, catalogue, broker):
    """Two sagas that ended 40 days ago (one completed, one compensated), one that ended
    now, one in flight and one parked (both started 40 days ago)."""
    done = place(alice_api)
    declined = place(alice_api, token="tok_declined")
    recent = place(alice_api)
    broker.deliver()
    live = place(alice_api)
    deliver_until(broker, "payments.execute")
    broker.take("payments.execute")  # held: the saga stays running
    parked = place(alice_api)
    deliver_until(broker, "payments.execute")
    broker.take("payments.execute")
    Saga.objects.filter(id=parked).update(state=Saga.State.PARKED)
    for saga_id in (done, declined):
        ended_ago(saga_id, days=40)
    old = {"created_at": F("created_at") - timedelta(days=40)}
    Saga.objects.filter(id__in=[live, parked]).update(**old)
    SagaEvent.objects.filter(saga_id__in=[live, parked]).update(**old)
    # An operator's note on a step of the completed saga: the audit trail stays.
    seq = SagaEvent.objects.filter(saga_id=done).aggregate(n=Max("seq"))["n"] + 1
    SagaEvent.objects.create(saga_id=done, seq=seq, step="reserve_stock", kind="operator_note", actor="ops")
    return {"done": done, "declined": declined, "recent": recent, "live": live, "parked": parked}


def test_purge_removes_old_finished_timelines_and_keeps_everything_else(history):
    assert Saga.objects.get(id=history["done"]).state == "completed"
    assert Saga.objects.get(id=history["declined"]).state == "compensated"
    assert Saga.objects.get(id=history["live"]).state == "running"
    before = {name: (step_events(s), saga_events(s)) for name, s in history.items()}
    assert all(steps and sagas for steps, sagas in before.values())
    steps_before = SagaStep.objects.count()

    result = retention.purge_sagas(older_than=timedelta(days=30))

    assert result["sagas"] == 2
    assert result["events"] == before["done"][0] - 1 + before["declined"][0]
    # Old and finished: only the operator's event is left of the step level.
    assert list(SagaEvent.objects.filter(saga_id=history["done"]).exclude(step="").values_list("actor", flat=True)) == [
        "ops"
    ]
    assert step_events(history["declined"]) == 0
    for name in ("done", "declined"):
        assert saga_events(history[name]) == before[name][1]  # started, completed/compensated...
        assert Saga.objects.get(id=history[name]).history_purged_at is not None
    # Ended a moment ago, in flight or parked: untouched, however old they are.
    for name in ("recent", "live", "parked"):
        assert (step_events(history[name]), saga_events(history[name])) == before[name]
        assert Saga.objects.get(id=history[name]).history_purged_at is None
    assert SagaStep.objects.count() == steps_before
    assert Saga.objects.count() == 5
    # The audit reads sagas and steps, never the timeline: the finished ones still agree.
    assert [v for v in run_audit() if v.rule != "saga_not_terminal"] == []


def test_purge_is_idempotent_and_bounded_per_run(history):
    first = retention.purge_sagas(older_than=timedelta(days=30), batch=1, max_batches=1)
    assert (first["sagas"], first["batches"]) == (1, 1)
    purged = Saga.objects.filter(history_purged_at__isnull=False).values_list("id", flat=True)
    assert len(purged) == 1
    # The oldest end goes first; the next run goes on with the other.
    second = retention.purge_sagas(older_than=timedelta(days=30), batch=1, max_batches=5)
    assert second["sagas"] == 1
    again = retention.purge_sagas(older_than=timedelta(days=30))
    assert again == {"sagas": 0, "events": 0, "batches": 0}


def test_a_saga_still_locked_waits_for_the_next_run(history):
    ready, release = threading.Event(), threading.Event()

    def hold() -> None:
        try:
            with transaction.atomic():
                Saga.objects.select_for_update().get(id=history["done"])
                ready.set()
                release.wait(timeout=30)
        finally:
            connections.close_all()

    if connections["default"].vendor != "postgresql":
        pytest.skip("SKIP LOCKED is PostgreSQL's")
    with ThreadPoolExecutor(1) as pool:
        holder = pool.submit(hold)
        assert ready.wait(timeout=10)
        try:
            result = retention.purge_sagas(older_than=timedelta(days=30))
        finally:
            release.set()
        holder.result()
    assert result["sagas"] == 1
    assert Saga.objects.get(id=history["done"]).history_purged_at is None
    assert retention.purge_sagas(older_than=timedelta(days=30))["sagas"] == 1


def test_the_command_and_beat_follow_the_setting(history, settings):
    settings.SAGA_RETENTION_DAYS = 0
    assert orchestration_tasks.purge_sagas() == {"sagas": 0, "events": 0, "batches": 0, "off": True}
    call_command("purge_sagas")  # off: nothing
    assert Saga.objects.filter(history_purged_at__isnull=False).count() == 0
    with pytest.raises(CommandError):
        call_command("purge_sagas", "--days", "0")

    settings.SAGA_RETENTION_DAYS = 60
    assert orchestration_tasks.purge_sagas()["sagas"] == 0  # ended 40 days ago: kept
    call_command("purge_sagas", "--days", "30", "--batch", "1", "--max-batches", "1")
    assert Saga.objects.filter(history_purged_at__isnull=False).count() == 1
    settings.SAGA_RETENTION_DAYS = 30
    assert orchestration_tasks.purge_sagas()["sagas"] == 1


def test_beat_runs_the_saga_purge_on_the_orchestrator_queue():
    entries = [e for e in settings.CELERY_BEAT_SCHEDULE.values() if e["task"] == "orchestration.purge_sagas"]
    assert len(entries) == 1
    assert entries[0]["options"]["queue"] == "orchestrator"
    assert entries[0]["schedule"] == settings.RETENTION_PURGE_INTERVAL
