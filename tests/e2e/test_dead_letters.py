"""Poison messages against a real worker: pushed straight onto a service queue with redis-py,
each is recorded as a dead letter, acknowledged and alerted, and the worker carries on."""

from __future__ import annotations

import base64
import json
import uuid

import pytest
import redis
from django.conf import settings

from orchestration import overview
from orchestration.models import Alert
from sagaplatform.kernel.models import DeadLetter
from tests.conftest import order_body
from tests.e2e.test_e2e_production import place, settle
from tests.processes import Worker, flush_broker, wait_for

pytestmark = [
    pytest.mark.production,
    pytest.mark.postgres,
    pytest.mark.django_db(transaction=True, databases="__all__"),
]

MAX_BYTES = 64 * 1024


def envelope(task: str, body: bytes, *, queue: str = "inventory", content_type: str = "application/json") -> bytes:
    """A message as kombu's Redis transport stores it (protocol 2)."""
    task_id = str(uuid.uuid4())
    return json.dumps(
        {
            "body": base64.b64encode(body).decode(),
            "content-encoding": "utf-8",
            "content-type": content_type,
            "headers": {"lang": "py", "task": task, "id": task_id, "root_id": task_id},
            "properties": {
                "correlation_id": task_id,
                "delivery_mode": 2,
                "delivery_info": {"exchange": "", "routing_key": queue},
                "priority": 0,
                "body_encoding": "base64",
                "delivery_tag": str(uuid.uuid4()),
            },
        }
    ).encode()


@pytest.fixture
def worker(django_db_setup, django_db_blocker):
    flush_broker()
    # One process, so that a worker that died shows at once; alerts raised every second.
    process = Worker(
        name="dead-letters",
        concurrency=1,
        extra_env={"SAGA_MAX_MESSAGE_BYTES": str(MAX_BYTES), "SAGA_ANTI_ENTROPY_INTERVAL": "1"},
    ).start()
    yield process
    process.stop()


def test_poison_messages_are_dead_lettered_and_the_worker_carries_on(worker, alice_api, admin_client, catalogue):
    client = redis.Redis.from_url(settings.REDIS_URL)
    args = json.dumps([[{"saga_id": str(uuid.uuid4())}], {}, {}]).encode()
    poison = {
        "not json": b"this is not json {",
        "json, not an envelope": b"[1, 2, 3]",
        "unknown task": envelope("inventory.no_such_task", args),
        "undecodable body": envelope("inventory.execute", b"\x00 not json"),
        "oversized": envelope("inventory.execute", b"x" * MAX_BYTES),
        "a command with no saga": envelope("inventory.execute", json.dumps([[{"step": "x"}], {}, {}]).encode()),
    }
    for raw in poison.values():
        client.lpush("inventory", raw)

    def recorded():
        assert worker.process.running(), f"the worker died: see {worker.log_path}"
        rows = list(DeadLetter.objects.using("inventory").order_by("id"))
        return len(rows) >= 6 and rows

    letters = wait_for(recorded, timeout=30, message=f"6 dead letters (log: {worker.log_path})")
    assert sorted(letter.reason for letter in letters) == sorted(
        ["malformed", "malformed", "unknown_task", "undecodable", "oversized", "failed"]
    )
    assert {letter.queue for letter in letters} == {"inventory"}
    assert any(letter.task == "inventory.no_such_task" for letter in letters)
    assert any(letter.body == "this is not json {" for letter in letters)
    failed = next(letter for letter in letters if letter.reason == "failed")
    assert (failed.task, failed.error) == ("inventory.execute", "KeyError: 'saga_id'")
    # Acknowledged: nothing of them is left queued or held unacknowledged.
    assert client.llen("inventory") == 0
    assert not [raw for raw in client.hvals("unacked") if b"no_such_task" in raw or b"not json" in raw]

    alerts = wait_for(
        lambda: (rows := list(Alert.objects.filter(kind="dead_letter"))) and len(rows) >= 6 and rows,
        timeout=20,
        message="an alert for each dead letter",
    )
    assert len(alerts) == 6
    assert all(alert.saga_id is None and alert.resolved_at is None for alert in alerts)
    assert not DeadLetter.objects.using("inventory").filter(alerted_at__isnull=True).exists()
    # Visible to an operator: the dashboard's overview, the admin's alerts and dead letters.
    assert overview.dead_letters()["open"] == 6
    page = admin_client.get("/admin/kernel/deadletter/", {"db": "inventory"})
    assert page.status_code == 200
    assert b"inventory.no_such_task" in page.content
    page = admin_client.get("/admin/orchestration/alert/", {"kind__exact": "dead_letter"})
    assert page.status_code == 200
    assert b"names a task no worker knows" in page.content

    # The worker still serves every queue, inventory's included.
    detail = settle(alice_api, place(alice_api, order_body()))
    assert detail["saga"]["state"] == "completed"
    assert worker.process.running()
