"""The service registry with real `celery worker` processes: a SIGKILLed worker's instances expire
(a clean stop deregisters them), and a step whose service has no live worker waits, then runs on
its first attempt once a worker for it starts, within a saga deadline shorter than the wait."""

from __future__ import annotations

import signal

import pytest
from django.utils import timezone

from orchestration import alerting
from orchestration.models import Saga, SagaEvent, SagaStep
from sagaplatform.kernel.clock import db_now
from sagaplatform.kernel.models import ServiceInstance
from tests.conftest import order_body
from tests.processes import Worker, flush_broker, wait_for, wait_until_quiet

pytestmark = [
    pytest.mark.slow,
    pytest.mark.e2e,
    pytest.mark.production,
    pytest.mark.django_db(transaction=True, databases="__all__"),
]

FAST_BEATS = {"WORKER_HEARTBEAT_SECONDS": "0.5", "SAGA_REGISTRY_TTL": "1.5"}
DISCOVERY = {**FAST_BEATS, "SAGA_REGISTRY_DISCOVERY": "true", "SAGA_NO_WORKER_RECHECK": "0.5"}


def instances(worker: str):
    return ServiceInstance.objects.using("default").filter(worker__startswith=f"{worker}@")


def alive(worker: str) -> list[ServiceInstance]:
    return list(instances(worker).filter(expires_at__gt=db_now("default")))


def test_a_killed_workers_instances_expire_and_a_stopped_one_deregisters():
    flush_broker()
    killed = Worker(name="reg-killed", queues=("payments", "shipping"), beat=False, extra_env=FAST_BEATS).start()
    stopped = Worker(name="reg-stopped", queues=("inventory",), beat=False, extra_env=FAST_BEATS).start()
    try:
        live = wait_for(lambda: len(alive("reg-killed")) == 2 and alive("reg-killed"), timeout=30, message="registered")
        assert {(i.service, tuple(i.queues)) for i in live} == {
            ("payments", ("payments",)),
            ("shipping", ("shipping",)),
        }
        assert {i.pid for i in live} == {killed.process.pid}  # the worker's main process
        assert all(i.code_version and i.definitions for i in live)
        first_beat = live[0].heartbeat_at
        wait_for(
            lambda: instances("reg-killed").get(service=live[0].service).heartbeat_at > first_beat,
            timeout=10,
            message="a heartbeat",
        )
        wait_for(lambda: alive("reg-stopped"), timeout=30, message="the other worker registered")

        killed.process.send(signal.SIGKILL)
        killed.process.wait_or_kill(timeout=10)
        wait_for(lambda: not alive("reg-killed"), timeout=10, interval=0.2, message="the killed worker to expire")
        # Expired, not deregistered: nobody was left to deregister it.
        assert instances("reg-killed").count() == 2

        stopped.stop()
        assert not instances("reg-stopped").exists()  # a clean shutdown deregisters at once
    finally:
        killed.stop()
        stopped.stop()


def test_a_step_waits_for_a_live_worker_and_runs_once_one_starts(alice_api, catalogue):
    flush_broker()
    deadline = 6.0
    env = {**DISCOVERY, "SAGA_DEADLINE_OVERRIDE": str(deadline), "SAGA_NO_WORKER_WAIT_LIMIT": "120"}
    others = ("orchestrator", "inventory", "orders", "shipping", "notifications")
    main = Worker(name="reg-main", queues=others, extra_env=env).start()
    payments = None
    try:
        wait_for(lambda: len(alive("reg-main")) == len(others), timeout=30, message="the main worker registered")
        response = alice_api.post("/api/orders/", order_body(), format="json")
        assert response.status_code == 202, response.content
        saga_id = response.json()["saga"]["id"]

        waiting = wait_for(
            lambda: SagaEvent.objects.filter(saga_id=saga_id, kind="step_deferred").first(),
            timeout=30,
            interval=0.2,
            message="the charge to wait for a payments worker",
        )
        assert waiting.step == "charge_payment"
        assert waiting.data["message"] == "no live instance of payments"
        firing = {f.labels["queue"] for f in alerting.no_live_worker(db_now("default"))}
        assert firing == {"payments"}

        # Longer than the saga's whole deadline: it keeps waiting, its step never attempted.
        saga = Saga.objects.get(id=saga_id)
        wait_for(
            lambda: (timezone.now() - saga.created_at).total_seconds() > deadline + 2,
            timeout=30,
            message="the deadline's length to pass",
        )
        charge = SagaStep.objects.get(saga_id=saga_id, name="charge_payment")
        assert (Saga.objects.get(id=saga_id).state, charge.state, charge.attempts) == ("running", "pending", 0)
        pushed = Saga.objects.get(id=saga_id).deadline_at - saga.created_at
        assert pushed.total_seconds() > deadline + 2  # the deadline moved with the wait
        assert SagaEvent.objects.filter(saga_id=saga_id, kind="step_deferred").count() == 1  # one per wait

        payments = Worker(name="reg-payments", queues=("payments",), beat=False, extra_env=env).start()
        wait_for(
            lambda: Saga.objects.get(id=saga_id).state in ("completed", "compensated", "failed", "parked"),
            timeout=60,
            interval=0.3,
            message="the saga to finish",
        )
        saga = Saga.objects.get(id=saga_id)
        assert saga.state == "completed", list(
            SagaEvent.objects.filter(saga_id=saga_id).order_by("seq").values_list("step", "kind", "data")
        )
        charge = SagaStep.objects.get(saga_id=saga_id, name="charge_payment")
        assert (charge.state, charge.attempts, charge.deferrals) == ("succeeded", 1, 0)
        assert alerting.no_live_worker(db_now("default")) == []
        wait_until_quiet()
    finally:
        main.stop()
        if payments:
            payments.stop()
