"""The engine and the sweeper with a real worker: a backlog longer than the step leases times
nothing out, and one saga the engine fails on stops no other saga."""

from __future__ import annotations

from datetime import timedelta

import pytest
from django.conf import settings
from django.utils import timezone

from orchestration.models import Alert, Saga, SagaEvent, SagaStep
from tests.conftest import order_body
from tests.processes import Worker, flush_broker, wait_for

pytestmark = [pytest.mark.production, pytest.mark.django_db(transaction=True, databases="__all__")]

# What the sweeper records when a lease expires: extended now, counted as a timeout before.
EXPIRED = ("lease_extended", "step_timed_out")


def place(api) -> str:
    response = api.post("/api/orders/", order_body(), format="json")
    assert response.status_code == 202, response.content
    return response.json()["saga"]["id"]


def states(saga_ids) -> list[str]:
    return list(Saga.objects.filter(id__in=saga_ids).values_list("state", flat=True))


def test_commands_queued_longer_than_their_lease_time_nothing_out(alice_api, catalogue):
    """2 s leases, and the service workers busy elsewhere (not started yet) while the
    orchestrator sends the first commands: they wait in their queue past their leases. Each lease
    runs from the start of its attempt, so the sweeper extends them instead of counting timed-out
    attempts, sends nothing again (the queue is not empty: nothing is lost), and once the
    services work through their queues every saga completes on its first attempts."""
    flush_broker()
    leases = {"SAGA_STEP_TIMEOUT_OVERRIDE": "2"}
    orchestrator = Worker(name="orchestrator-backlog", queues=("orchestrator",), extra_env=leases).start()
    services = Worker(name="services-backlog", queues=settings.SERVICE_ALIASES, beat=False, extra_env=leases)
    try:
        sagas = [place(alice_api) for _ in range(4)]
        wait_for(
            lambda: (
                SagaEvent.objects.filter(saga_id__in=sagas, step="reserve_stock", kind__in=EXPIRED).count()
                >= len(sagas)
            ),
            timeout=30,
            message="every reservation's lease to expire while its command waits in the queue",
        )
        waiting = set(SagaEvent.objects.filter(saga_id__in=sagas, kind="lease_extended").values_list("id", flat=True))
        services.start()
        wait_for(lambda: states(sagas).count("completed") == len(sagas), timeout=60, message="every saga to complete")
    finally:
        services.stop()
        orchestrator.stop()

    events = SagaEvent.objects.filter(saga_id__in=sagas)
    assert not events.filter(kind="step_timed_out").exists()
    assert set(SagaStep.objects.filter(saga_id__in=sagas, kind="action").values_list("attempts", flat=True)) == {1}
    # While the commands waited (the queue held them), nothing was sent again.
    queued = events.filter(id__in=waiting)
    assert {e.data["reason"] for e in queued} == {"queued"}
    assert not any(e.data["resent"] for e in queued)


def test_a_saga_the_engine_fails_on_stops_no_other(alice_api, catalogue):
    """A saga whose definition is gone, with an expired lease and deadline, used to abort every
    sweep at its row: the handling windows of every other order never ended. It is parked with
    an alert now, and the others are dispatched."""
    flush_broker()
    long_ago = timezone.now() - timedelta(minutes=5)
    broken = Saga.objects.create(definition="retired_definition", context={})
    Saga.objects.filter(id=broken.id).update(state="running", deadline_at=long_ago)
    step = SagaStep.objects.create(saga=broken, name="reserve_stock", position=0, service="inventory", attempts=1)
    SagaStep.objects.filter(id=step.id).update(state="running", deadline_at=long_ago)
    worker = Worker(name="sweep-isolation", extra_env={"SHIPPING_HANDLING_SECONDS": "1"}).start()
    try:
        sagas = [place(alice_api) for _ in range(2)]
        wait_for(
            lambda: states(sagas).count("completed") == len(sagas),
            timeout=40,
            message="the other sagas to be dispatched and complete",
        )
    finally:
        worker.stop()

    # Each waited out its handling window, which only the sweeper ends.
    assert SagaEvent.objects.filter(saga_id__in=sagas, kind="step_scheduled").count() == len(sagas)
    broken.refresh_from_db()
    assert broken.state == "parked"
    assert "retired_definition" in Alert.objects.get(saga=broken, resolved_at__isnull=True).message
