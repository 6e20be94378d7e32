"""Retention: `manage.py purge` and beat's `kernel.purge` delete published outbox rows and the
barrier rows of sagas that ended long ago, and keep whatever a saga in flight, the relay or a
late duplicate may still need."""

from __future__ import annotations

from datetime import timedelta

import pytest
from django.conf import settings
from django.core.management import call_command
from django.db.models import F

from orchestration.audit import run_audit
from orchestration.models import Saga
from sagaplatform.kernel import retention
from sagaplatform.kernel import tasks as kernel_tasks
from sagaplatform.kernel.clock import db_now
from sagaplatform.kernel.models import Barrier, OutboxMessage
from tests.conftest import deliver_until, order_body

pytestmark = pytest.mark.django_db(transaction=True, databases="__all__")

SERVICES = settings.SERVICE_ALIASES


def barrier_rows(saga_id) -> int:
    return sum(Barrier.objects.using(alias).filter(saga_id=saga_id).count() for alias in SERVICES)


def outbox_rows(saga_id) -> int:
    return sum(
        OutboxMessage.objects.using(alias).filter(payload__saga_id=str(saga_id)).count()
        for alias in settings.DATABASE_ALIASES
    )


def age(*, days: float) -> None:
    """Everything written so far happened `days` ago (the sagas ended then, too)."""
    shift = timedelta(days=days)
    for alias in settings.DATABASE_ALIASES:
        Barrier.objects.using(alias).update(created_at=F("created_at") - shift)
        OutboxMessage.objects.using(alias).filter(published_at__isnull=False).update(
            published_at=F("published_at") - shift
        )
    Saga.objects.filter(finished_at__isnull=False).update(finished_at=F("finished_at") - shift)


def place(api, **kwargs) -> str:
    response = api.post("/api/orders/", order_body(**kwargs), format="json")
    assert response.status_code == 202, response.content
    return response.json()["saga"]["id"]


def test_purge_removes_what_ended_long_ago_and_keeps_what_may_still_be_needed(alice_api, catalogue, broker):
    done = place(alice_api)
    declined = place(alice_api, token="tok_declined")
    broker.deliver()
    assert Saga.objects.get(id=done).state == "completed"
    assert Saga.objects.get(id=declined).state == "compensated"
    # In flight: its stock is reserved, its charge held back.
    live = place(alice_api)
    deliver_until(broker, "payments.execute")
    held = broker.take("payments.execute")
    assert Saga.objects.get(id=live).state == "running"
    assert barrier_rows(live) > 0
    # The only copy of a message the broker never took.
    stranded = OutboxMessage.objects.using("inventory").create(
        task="orchestration.handle_reply",
        queue="orchestrator",
        payload={"saga_id": done},
        available_at=db_now("inventory"),
    )
    age(days=10)
    # Ended a moment ago: a duplicate of its messages may still be on its way.
    recent = place(alice_api)
    broker.deliver()
    assert Saga.objects.get(id=recent).state == "completed"
    before = {saga: (barrier_rows(saga), outbox_rows(saga)) for saga in (done, declined, live, recent)}
    assert all(barrier and outbox for barrier, outbox in before.values())
    without_saga = OutboxMessage.objects.using("notifications").filter(payload__saga_id__isnull=True).count()
    assert without_saga > 0  # the notifications' deliveries

    call_command("purge")

    assert barrier_rows(done) == barrier_rows(declined) == 0
    assert outbox_rows(declined) == 0
    assert outbox_rows(done) == 1  # the unpublished one
    assert OutboxMessage.objects.using("inventory").filter(id=stranded.id).exists()
    assert (barrier_rows(live), outbox_rows(live)) == before[live]
    assert (barrier_rows(recent), outbox_rows(recent)) == before[recent]
    # Deliveries with no saga go by their age only: the old ones, not the recent order's.
    left = OutboxMessage.objects.using("notifications").filter(payload__saga_id__isnull=True)
    assert 0 < left.count() < without_saga
    assert not left.filter(published_at__lt=db_now("notifications") - timedelta(days=1)).exists()

    # What was kept is what the barrier needed: a duplicate of the saga in flight's reservation
    # replays instead of reserving twice, the saga completes, and the audit finds nothing wrong.
    reserve = next(m for m in broker.delivered if m["task"] == "inventory.execute" and m["payload"]["saga_id"] == live)
    broker.queue[:0] = [reserve, *held]
    broker.deliver()
    assert Saga.objects.get(id=live).state == "completed"
    OutboxMessage.objects.using("inventory").filter(id=stranded.id).update(published_at=db_now("inventory"))
    assert run_audit() == []


def test_the_barrier_is_never_purged_younger_than_its_safe_minimum(alice_api, catalogue, broker, settings):
    settings.BARRIER_RETENTION = 60  # below what the delivery settings allow
    floor = retention.minimum_barrier_age()
    visibility = settings.CELERY_BROKER_TRANSPORT_OPTIONS.get("visibility_timeout", 3600)
    assert floor > timedelta(seconds=visibility + settings.CELERY_TASK_TIME_LIMIT + 60)
    assert retention.barrier_age() == floor
    saga = place(alice_api)
    broker.deliver()
    rows = barrier_rows(saga)
    assert rows > 0

    age(days=(floor - timedelta(minutes=5)).total_seconds() / 86400)
    kernel_tasks.purge("inventory")  # what beat runs
    call_command("purge", "--barrier-age", "60")
    assert barrier_rows(saga) == rows

    age(days=10 / 1440)
    call_command("purge", "--barrier-age", "60")
    assert barrier_rows(saga) == 0


def test_beat_purges_every_database_from_a_worker_of_its_own_queue():
    entries = {e["args"][0]: e for e in settings.CELERY_BEAT_SCHEDULE.values() if e["task"] == "kernel.purge"}
    assert set(entries) == set(settings.DATABASE_ALIASES)
    for alias, entry in entries.items():
        assert entry["options"]["queue"] == (alias if alias in SERVICES else "orchestrator")
        assert entry["schedule"] == settings.RETENTION_PURGE_INTERVAL


def test_a_beat_run_stops_at_its_time_budget_and_the_next_one_goes_on(alice_api, catalogue, broker, monkeypatch):
    saga = place(alice_api)
    broker.deliver()
    age(days=30)
    rows = barrier_rows(saga), outbox_rows(saga)
    assert all(rows)

    monkeypatch.setattr(retention, "RUN_BUDGET_SECONDS", -1.0)  # spent before it starts
    assert kernel_tasks.purge("inventory") == {"outbox": 0, "barrier": 0}
    assert (barrier_rows(saga), outbox_rows(saga)) == rows

    monkeypatch.undo()
    for alias in settings.DATABASE_ALIASES:
        kernel_tasks.purge(alias)
    assert (barrier_rows(saga), outbox_rows(saga)) == (0, 0)
