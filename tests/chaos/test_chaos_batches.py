"""A pool process killed in the middle of a batch, in the middle of a drain: the worker takes
several orders' start messages as one batch (one pool process, a long batch wait kept even when
the pool is idle, so they gather), runs their reserve commands right there as one batch (the
engine's commands are run inline by the worker that committed them), and dies after running them
all and before that batch's commit. The start messages get Celery's verdict for a lost worker
(sent again; the sagas exist, so they change nothing); the reserve commands committed with the
sagas and were never marked published, so the relay sends them once past its grace. Every order
completes, each reservation is made once, the stock adds up and the audit is clean."""

from __future__ import annotations

import re
import time
from decimal import Decimal

import pytest

from inventory.models import Reservation
from orchestration.audit import run_audit
from sagaplatform.kernel import faults
from sagaplatform.kernel.models import FaultRule
from tests.chaos.test_chaos import assert_paid_once, place, settled
from tests.conftest import mug
from tests.stack import PASSWORD, Stack

pytestmark = [pytest.mark.production, pytest.mark.django_db(transaction=True, databases="__all__")]

ORDERS = 6


@pytest.fixture(scope="module")
def stack(django_db_setup, django_db_blocker):
    running = Stack("batches", step_timeout=5.0, concurrency=1)
    # One pool process, and up to 0.4 s for a batch to fill: the orders' commands gather.
    running.env["SAGA_BATCH_WAIT_MS"] = "400"
    running.env["SAGA_BATCH_WAIT_WHEN_IDLE"] = "1"  # the first command too, though the pool is idle
    running.start()
    yield running
    running.stop()


@pytest.fixture
def customer(django_user_model, catalogue):
    return django_user_model.objects.create_user("batcher", "batcher@example.com", PASSWORD).username


def test_a_pool_process_killed_mid_batch_loses_and_repeats_nothing(stack, customer):
    FaultRule.objects.using("inventory").create(
        service="inventory", operation="reserve", crash_point="before_commit", crashes_left=1
    )
    time.sleep(faults.CACHE_SECONDS + 0.2)  # the workers' rule cache
    saga_ids = [place(stack, customer)["saga"]["id"] for _ in range(ORDERS)]

    sagas = settled(saga_ids, timeout=90)

    assert {saga.state for saga in sagas} == {"completed"}
    log = stack.log("worker0")
    assert "crashing at before_commit of inventory.reserve" in log  # it did die, mid-batch
    crashed = log[: log.index("crashing at before_commit")]
    batches = [int(n) for n in re.findall(r"inventory\.execute: (\d+) messages in one batch", crashed)]
    assert batches, "no inventory batch before the crash"
    assert batches[-1] > 1  # the batch it died in held several orders' commands
    for saga_id in saga_ids:
        assert Reservation.objects.using("inventory").filter(saga_id=saga_id).count() == 1
        assert_paid_once(saga_id, Decimal("25.00"))
    assert mug() == (50 - 2 * ORDERS, 0)
    assert run_audit() == []
