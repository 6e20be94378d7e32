"""The service registry (`sagaplatform/kernel/registry.py`): registering, heartbeats and expiry in
the database backend; the backend interface with a test-only backend; the orchestrator resolving
a service's queue through it (cached, never waiting for a slow registry, failing open); a step
waiting while no live instance serves its service, without consuming its attempts or the saga's
deadline, up to the wait limit; the alert, the metrics, the overview and the admin reading it."""

from __future__ import annotations

import threading
import time
from datetime import datetime, timedelta

import pytest
from django.db import connection

from orchestration import alerting, engine, overview
from orchestration.engine import deferral
from orchestration.models import Saga, SagaEvent, SagaStep
from sagaplatform import workers
from sagaplatform.kernel import registry
from sagaplatform.kernel.clock import db_now
from sagaplatform.kernel.models import FaultRule, ServiceInstance
from sagaplatform.observability.collectors import DatabaseCollector
from tests.conftest import order_body
from tests.processes import wait_for

MEMORY = "tests.unit.ops.test_registry.MemoryRegistry"
ALL_BUT_PAYMENTS = ["orchestrator", "inventory", "orders", "shipping", "notifications"]


class MemoryRegistry(registry.RegistryBackend):
    """A test-only backend: a dict, on the process clock. What a Consul or Kubernetes backend
    would be: a subclass named by SAGA_REGISTRY_BACKEND, nothing else changed."""

    store: dict[str, registry.Instance] = {}
    reads = 0
    gate: threading.Event | None = None  # set: reads wait on it (a slow registry)
    broken = False

    def heartbeat(self, instances, *, ttl):
        now = datetime.now().astimezone()
        for i in instances:
            old = self.store.get(i.key)
            started = old.started_at if old else now
            self.store[i.key] = registry.Instance(
                **{**i.__dict__, "started_at": started, "heartbeat_at": now, "expires_at": now + timedelta(seconds=ttl)}
            )

    def deregister(self, worker):
        for key in [k for k, i in self.store.items() if i.worker == worker]:
            del self.store[key]

    def instances(self):
        type(self).reads += 1
        if self.gate is not None:
            self.gate.wait(10)
        if self.broken:
            raise ConnectionError("registry unreachable")
        return datetime.now().astimezone(), list(self.store.values())


@pytest.fixture
def memory(settings):
    settings.SAGA_REGISTRY_BACKEND = MEMORY
    settings.SAGA_REGISTRY_DISCOVERY = True
    MemoryRegistry.store, MemoryRegistry.reads, MemoryRegistry.gate, MemoryRegistry.broken = {}, 0, None, False
    registry.invalidate()
    yield MemoryRegistry
    registry.invalidate()


@pytest.fixture
def discovery(settings):
    settings.SAGA_REGISTRY_DISCOVERY = True
    registry.invalidate()
    yield
    registry.invalidate()


# --- The database backend -----------------------------------------------------------------------


@pytest.mark.django_db(databases="__all__")
def test_a_worker_registers_one_instance_per_service_and_renews_it(settings):
    settings.SAGA_CODE_VERSION = "abc123"
    workers.announce("celery@node-1", ["payments", "inventory", "payments.eu"])
    rows = {r.service: r for r in ServiceInstance.objects.using("default")}
    assert set(rows) == {"payments", "inventory"}
    payments = rows["payments"]
    assert payments.instance == "celery@node-1/payments"
    assert payments.queues == ["payments", "payments.eu"]
    assert payments.pid > 0
    assert payments.host
    assert payments.code_version == "abc123"
    assert any(d.startswith("place_order v") for d in payments.definitions), payments.definitions
    assert payments.tasks_running == 0
    assert payments.oldest_task_age is None
    assert payments.expires_at - payments.heartbeat_at == timedelta(seconds=registry.ttl())
    # Only `default` holds the registry (the router).
    with pytest.raises(Exception):  # noqa: B017, PT011 (the table does not exist there)
        list(ServiceInstance.objects.using("payments").all())

    first_beat, started = payments.heartbeat_at, payments.started_at
    workers.announce("celery@node-1", ["payments", "inventory", "payments.eu"])
    again = ServiceInstance.objects.using("default").get(instance="celery@node-1/payments")
    assert again.heartbeat_at > first_beat  # renewed, on the database clock
    assert again.started_at == started  # not re-registered
    assert ServiceInstance.objects.using("default").count() == 2


def test_a_worker_reports_its_running_tasks_and_the_age_of_the_oldest():
    from celery.worker import state

    class Request:  # what Celery's worker state holds for each task its pool runs
        def __init__(self, started):
            self.time_start = started

    running = [Request(time.time() - 5), Request(time.time() - 1), Request(None)]  # the last not started yet
    for request in running:
        state.active_requests.add(request)
    try:
        (instance,) = registry.describe("celery@n1", ["payments"], host="h", pid=1, started_at=None)
    finally:
        for request in running:
            state.active_requests.discard(request)
    assert instance.tasks_running == 2
    assert instance.oldest_task_age == pytest.approx(5, abs=0.5)
    (idle,) = registry.describe("celery@n1", ["payments"], host="h", pid=1, started_at=None)
    assert (idle.tasks_running, idle.oldest_task_age) == (0, None)


@pytest.mark.django_db(databases="__all__")
def test_an_instance_that_misses_its_heartbeats_expires_and_a_clean_shutdown_deregisters(settings):
    settings.SAGA_REGISTRY_TTL = 0.3
    workers.announce("celery@quiet", ["shipping"])
    workers.announce("celery@leaving", ["orders"])
    assert {w["name"] for w in workers.live_workers()} == {"celery@quiet", "celery@leaving"}

    workers.withdraw("celery@leaving")
    assert not ServiceInstance.objects.using("default").filter(worker="celery@leaving").exists()

    wait_for(lambda: not workers.live_workers(), timeout=5, interval=0.05, message="the silent instance to expire")
    view = registry.snapshot_view()["instances"]
    assert [(i["instance"], i["alive"]) for i in view] == [("celery@quiet/shipping", False)]  # still listed
    assert view[0]["heartbeat_age"] >= 0.3

    # Long-expired instances are forgotten by the next heartbeat of any worker.
    settings.SAGA_REGISTRY_FORGET_AFTER = 0
    settings.SAGA_REGISTRY_TTL = 30
    workers.announce("celery@other", ["inventory"])
    assert list(ServiceInstance.objects.using("default").values_list("worker", flat=True)) == ["celery@other"]


@pytest.mark.django_db(databases="__all__")
@pytest.mark.skipif(connection.vendor != "postgresql", reason="a statement timeout is PostgreSQL's")
def test_a_registry_read_is_bounded_and_leaves_the_callers_transaction_as_it_was(settings, monkeypatch):
    from django.db import OperationalError, transaction

    settings.SAGA_REGISTRY_TIMEOUT = 0.05
    with transaction.atomic(using="default"), connection.cursor() as cursor:  # as the engine calls it
        registry.DatabaseRegistry().instances()
        cursor.execute("SHOW statement_timeout")
        assert cursor.fetchone()[0] == "0"  # the bound applied to the registry's queries only

        def slow_clock(alias):
            cursor.execute("SELECT pg_sleep(2)")  # the registry's database is slow
            return db_now(alias)

        monkeypatch.setattr(registry, "db_now", slow_clock)
        began = time.monotonic()
        with pytest.raises(OperationalError, match="statement timeout"):
            registry.DatabaseRegistry().instances()
        assert time.monotonic() - began < 1.5
        cursor.execute("SELECT 1")  # the caller's transaction is intact
        assert cursor.fetchone()[0] == 1
        cursor.execute("SHOW statement_timeout")
        assert cursor.fetchone()[0] == "0"


# --- The backend interface and resolution -----------------------------------------------------------


def test_the_backend_is_whatever_class_the_setting_names(memory):
    assert isinstance(registry.backend(), MemoryRegistry)
    workers.announce("celery@n1", ["payments.blue"])
    assert [w["name"] for w in workers.live_workers()] == ["celery@n1"]
    assert registry.resolve("payments") == registry.Resolution("payments.blue", True)  # its live queue
    workers.announce("celery@n2", ["payments"])
    assert registry.resolve("payments") == registry.Resolution("payments", True)  # its own, when served
    assert registry.resolve("shipping") == registry.Resolution("shipping", False)  # none live


def test_resolution_reads_the_registry_at_most_once_a_second_per_process(memory, settings):
    settings.SAGA_REGISTRY_CACHE_SECONDS = 60
    workers.announce("celery@n1", ["payments"])
    memory.reads = 0
    for _ in range(1000):
        assert registry.resolve("payments").live is True
    assert memory.reads == 1
    workers.withdraw("celery@n1")  # this process's own change invalidates its snapshot
    assert registry.resolve("payments").live is False
    assert memory.reads == 2


def test_a_slow_registry_never_holds_up_a_send(memory, settings):
    settings.SAGA_REGISTRY_CACHE_SECONDS = 0  # every call wants a fresh read
    workers.announce("celery@n1", ["payments"])
    assert registry.resolve("payments").live is True
    memory.gate = threading.Event()  # the registry stops answering
    reader = threading.Thread(target=registry.resolve, args=("payments",))
    reader.start()
    wait_for(lambda: registry._refreshing.locked(), timeout=5, interval=0.01, message="a read in progress")
    began = time.monotonic()
    answers = [registry.resolve("payments") for _ in range(100)]  # while that read hangs
    assert time.monotonic() - began < 1
    assert set(answers) == {registry.Resolution("payments", True)}  # the last live set
    memory.gate.set()
    reader.join()


def test_an_unreadable_registry_fails_open(memory, settings):
    settings.SAGA_REGISTRY_CACHE_SECONDS = 0
    settings.SAGA_REGISTRY_TTL = 0.2
    workers.announce("celery@n1", ["inventory"])
    assert registry.resolve("payments").live is False
    memory.broken = True
    assert registry.resolve("payments").live is False  # the last good live set, within a TTL
    wait_for(lambda: registry.resolve("payments").live is None, timeout=5, interval=0.05, message="unknown")
    assert registry.resolve("payments") == registry.Resolution("payments", None)  # sent as without a registry
    memory.broken = False
    assert registry.resolve("payments").live is False


def test_discovery_off_sends_to_the_services_own_queue(memory, settings):
    settings.SAGA_REGISTRY_DISCOVERY = False
    assert registry.resolve("payments") == registry.Resolution("payments", None)
    assert memory.reads == 0


# --- The engine: waiting for a live instance ---------------------------------------------------------

ENGINE_DB = pytest.mark.django_db(transaction=True, databases="__all__")  # after-commit publishing


def _steps(saga_id) -> dict[str, SagaStep]:
    return {s.name: s for s in SagaStep.objects.filter(saga_id=saga_id)}


def _come_due(saga_id, name: str) -> None:
    """Time passes: the waiting step's next check is due (the sweeper would run it)."""
    SagaStep.objects.filter(saga_id=saga_id, name=name).update(next_attempt_at=db_now("default"))
    engine.saga_advance(saga_id=saga_id)


@ENGINE_DB
def test_a_step_waits_for_a_live_instance_without_consuming_attempts_or_deadline(
    memory, alice_api, catalogue, broker, settings, monkeypatch
):
    settings.SAGA_NO_WORKER_RECHECK = 5
    # No jitter on the rechecks: the checks below come due at once (no time passes), so with a
    # random delay each a later check may resume sooner than the first and rightly keep the
    # deadline it set (it failed one run in four when the first delay was the longest).
    monkeypatch.setattr(deferral.random, "uniform", lambda low, high: low)
    settings.SAGA_NO_WORKER_WAIT_LIMIT = 600
    workers.announce("celery@main", ALL_BUT_PAYMENTS)
    response = alice_api.post("/api/orders/", order_body(), format="json")
    assert response.status_code == 202, response.content
    saga_id = response.json()["saga"]["id"]
    broker.deliver()

    charge = _steps(saga_id)["charge_payment"]
    assert (charge.state, charge.attempts, charge.deferrals) == ("pending", 0, 0)
    assert charge.next_attempt_at is not None
    assert not any(m["task"] == "payments.execute" for m in broker.delivered)  # nothing sent to payments
    waits = SagaEvent.objects.filter(saga_id=saga_id, kind="step_deferred")
    assert waits.count() == 1
    event = waits.get()
    assert event.step == "charge_payment"
    assert event.data["reason"] == "no_live_instance"
    assert event.data["message"] == "no live instance of payments"
    saga = Saga.objects.get(id=saga_id)
    left = event.data["deadline_left"]
    assert left > 0
    # The deadline is pushed past the next check by the time that was left.
    assert (saga.deadline_at - charge.next_attempt_at).total_seconds() == pytest.approx(left, abs=0.01)

    # The alert fires for the payments queue.
    firing = alerting.no_live_worker(db_now("default"))
    assert [(f.labels, f.summary) for f in firing] == [
        ({"queue": "payments"}, "No live instance of payments consumes the payments queue")
    ]

    # Checks while nobody serves payments: still waiting, still one event, the deadline moves on.
    for _ in range(3):
        _come_due(saga_id, "charge_payment")
        assert _steps(saga_id)["charge_payment"].state == "pending"
    assert waits.count() == 1
    later = Saga.objects.get(id=saga_id)
    assert later.deadline_at > saga.deadline_at

    # A payments worker registers: the step starts at its next check, on its first attempt.
    workers.announce("celery@payments-1", ["payments"])
    _come_due(saga_id, "charge_payment")
    broker.deliver()
    assert Saga.objects.get(id=saga_id).state == "completed"
    charge = _steps(saga_id)["charge_payment"]
    assert (charge.state, charge.attempts, charge.deferrals) == ("succeeded", 1, 0)
    assert alerting.no_live_worker(db_now("default")) == []


@ENGINE_DB
def test_a_transient_failure_while_no_instance_is_live_is_not_counted(memory, alice_api, catalogue, broker, settings):
    settings.SAGA_RETRY_MAX_INTERVAL_OVERRIDE = 0.01
    workers.announce("celery@main", [*ALL_BUT_PAYMENTS, "payments"])
    FaultRule.objects.using("payments").create(service="payments", operation="charge", fail_first=1)
    response = alice_api.post("/api/orders/", order_body(), format="json")
    saga_id = response.json()["saga"]["id"]
    broker.deliver(skip=("payments.execute",))  # the charge is sent, not yet run
    assert _steps(saga_id)["charge_payment"].attempts == 1
    # payments' only worker goes away; the attempt it ran fails transiently.
    workers.withdraw("celery@main")
    workers.announce("celery@main", ALL_BUT_PAYMENTS)
    broker.run(broker.take("payments.execute")[0])
    broker.deliver(skip=("payments.execute",))
    charge = _steps(saga_id)["charge_payment"]
    assert (charge.state, charge.attempts, charge.deferrals) == ("retrying", 2, 1)  # held: not counted
    held = SagaEvent.objects.filter(saga_id=saga_id, kind="step_deferred").last()
    assert held.data["reason"] == "no_live_instance"
    assert held.data["not_counted"] is True

    workers.announce("celery@pay", ["payments"])
    broker.deliver()
    assert Saga.objects.get(id=saga_id).state == "completed"


@ENGINE_DB
def test_past_the_wait_limit_the_step_goes_ahead_as_without_a_registry(memory, alice_api, catalogue, broker, settings):
    settings.SAGA_NO_WORKER_WAIT_LIMIT = 30
    workers.announce("celery@main", ALL_BUT_PAYMENTS)
    saga_id = alice_api.post("/api/orders/", order_body(), format="json").json()["saga"]["id"]
    broker.deliver()
    assert _steps(saga_id)["charge_payment"].state == "pending"
    # The wait began longer ago than the limit.
    event = SagaEvent.objects.get(saga_id=saga_id, kind="step_deferred")
    event.data["since"] = (datetime.fromisoformat(event.data["since"]) - timedelta(seconds=31)).isoformat()
    event.save()
    _come_due(saga_id, "charge_payment")
    charge = _steps(saga_id)["charge_payment"]
    assert (charge.state, charge.attempts) == ("running", 1)
    sent = [m for m in broker.queue if m["task"] == "payments.execute"]
    assert [m["queue"] for m in sent] == ["payments"]  # its own queue, as without a registry


@ENGINE_DB
def test_commands_go_to_the_queue_a_live_instance_consumes(memory, alice_api, catalogue, broker):
    workers.announce("celery@main", ALL_BUT_PAYMENTS)
    workers.announce("celery@blue", ["payments.blue"])
    saga_id = alice_api.post("/api/orders/", order_body(), format="json").json()["saga"]["id"]
    broker.deliver()
    assert Saga.objects.get(id=saga_id).state == "completed"
    queues = {m["task"]: m["queue"] for m in broker.delivered if m["task"].endswith(".execute")}
    assert queues["payments.execute"] == "payments.blue"
    assert queues["inventory.execute"] == "inventory"


# --- What reads the registry: the overview, the metrics, the admin ---------------------------------


@pytest.mark.django_db(databases="__all__")
def test_the_overview_metrics_and_admin_show_the_registry(discovery, settings, admin_client):
    settings.SAGA_CODE_VERSION = "v-test"
    workers.announce("celery@node-1", ["payments", "inventory"])
    settings.SAGA_REGISTRY_TTL = 0.01
    workers.announce("celery@gone", ["shipping"])
    wait_for(
        lambda: not any(i["alive"] for i in overview.registry_instances() if i["worker"] == "celery@gone"),
        timeout=5,
        interval=0.05,
        message="celery@gone to expire",
    )
    ov = overview.overview()
    instances = {i["instance"]: i for i in ov["instances"]}
    assert set(instances) == {"celery@node-1/inventory", "celery@node-1/payments", "celery@gone/shipping"}
    payments = instances["celery@node-1/payments"]
    assert payments["alive"]
    assert payments["code_version"] == "v-test"
    assert payments["definitions"]
    assert payments["heartbeat_age"] >= 0
    assert "oldest_task_age" in payments
    assert not instances["celery@gone/shipping"]["alive"]
    assert {w["name"]: w["alive"] for w in ov["workers"]} == {"celery@node-1": True, "celery@gone": False}

    families = {f.name: f for f in DatabaseCollector().collect()}
    samples = {tuple(s.labels.values()): s.value for s in families["sagaplatform_registry_live_instances"].samples}
    assert samples[("payments", "payments")] == 1
    assert samples[("shipping", "shipping")] == 0
    up = {s.labels["source"]: s.value for s in families["sagaplatform_collector_up"].samples}
    assert up["registry"] == 1

    client = admin_client  # a superuser: even they may not add or change an instance
    page = client.get("/admin/kernel/serviceinstance/")
    assert page.status_code == 200
    assert b"celery@node-1" in page.content
    live = client.get("/admin/kernel/serviceinstance/", {"alive": "yes"}).content
    assert b"celery@gone" not in live
    assert client.get("/admin/kernel/serviceinstance/add/").status_code == 403  # read-only
