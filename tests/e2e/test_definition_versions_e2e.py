"""A deploy that changes the saga definitions never breaks a saga in flight, with real workers.

Sagas of every style start on version 1 and are caught mid-flow (the orchestrated, parallel and
choreographed ones in the shipping handling window, the TCC one in its last step); one more is
parked. The workers are then restarted on changed definitions (`tests/definitions_changed.py`,
version 2: a step added, one renamed, one removed, a compensation changed). The sagas in flight
finish on version 1, new sagas run version 2, and an operator retry of the parked saga runs
version 1. The API shows each saga's version.
"""

from __future__ import annotations

import pytest

from orchestration import definitions, engine
from orchestration.audit import run_audit
from orchestration.checks import stale_versions
from orchestration.models import Saga, SagaStep
from sagaplatform.kernel.models import FaultRule
from tests import definitions_changed
from tests.conftest import order_body
from tests.processes import Worker, flush_broker, wait_for, wait_until_quiet

pytestmark = [pytest.mark.production, pytest.mark.django_db(transaction=True, databases="__all__")]

MODES = ["orchestrated", "parallel", "tcc", "choreography"]
DONE = {"succeeded", "confirmed"}  # a TCC participant ends confirmed
AT_REST = {"completed", "compensated", "cancelled", "failed", "parked"}
V1_MODES = dict(definitions.MODES)
V1 = {mode: d.label for mode, d in V1_MODES.items()}
V2_MODES = definitions_changed.modes(dict(definitions.MODES))


def place(api, mode: str) -> dict:
    response = api.post("/api/orders/", {**order_body(), "mode": mode}, format="json")
    assert response.status_code == 202, response.content
    return response.json()


def saga_of(api, receipt: dict) -> dict:
    return api.get(receipt["url"]).json()["saga"]


def settle(api, operator_api, receipt: dict, timeout: float = 60) -> dict:
    """The settled saga as the operators' saga API shows it (with its version)."""

    def done():
        saga = saga_of(api, receipt)
        return operator_api.get(f"/api/sagas/{saga['id']}/").json() if saga["state"] in AT_REST else None

    return wait_for(done, timeout=timeout, interval=0.3, message=f"order {receipt['id']} to settle")


def step_states(saga: dict) -> dict:
    return {s["name"]: s["state"] for s in saga["steps"]}


def mid_flow(api, receipt: dict, mode: str) -> bool:
    saga = saga_of(api, receipt)
    states = step_states(saga)
    if mode == "tcc":  # the confirmation message hangs (the fault below)
        return states.get("notify_customer") == "running"
    # In the handling window: booked, not dispatched (the tracker may lease the waiting step).
    return states.get("schedule_shipment") == "succeeded" and states.get("dispatch_shipment") in ("pending", "running")


def test_a_deploy_of_changed_definitions_leaves_the_sagas_in_flight_on_their_version(
    alice_api, operator_api, catalogue, monkeypatch
):
    flush_broker()
    # Version 1. A handling window long enough to restart the workers in; the TCC saga's last
    # step hangs a while.
    hang = FaultRule.objects.using("notifications").create(
        service="notifications", operation="send_confirmation", hang_seconds=15
    )
    v1 = Worker(name="versions-v1", concurrency=3, extra_env={"SHIPPING_HANDLING_SECONDS": "25"}).start()
    v2 = None
    try:
        old = {mode: place(alice_api, mode) for mode in MODES}
        to_park = place(alice_api, "orchestrated")
        waiting = [*old.items(), ("orchestrated", to_park)]

        def all_mid_flow() -> bool:
            waiting[:] = [(mode, receipt) for mode, receipt in waiting if not mid_flow(alice_api, receipt, mode)]
            return not waiting

        wait_for(all_mid_flow, timeout=60, interval=0.3, message="every saga mid-flow")
        parked_id = saga_of(alice_api, to_park)["id"]
        assert engine.saga_park_broken(saga_id=parked_id, error=RuntimeError("parked by the test"))

        # The deploy: the workers restart on the changed definitions (the web process too).
        v1.stop()
        hang.delete()
        v2 = Worker(
            name="versions-v2",
            concurrency=3,
            extra_env={"SHIPPING_HANDLING_SECONDS": "0", "SAGA_DEFINITIONS_MODULE": "tests.definitions_changed"},
        ).start()
        for mode, definition in V2_MODES.items():
            monkeypatch.setitem(definitions.MODES, mode, definition)
            monkeypatch.setitem(definitions.DEFINITIONS, definition.name, definition)

        new = {mode: place(alice_api, mode) for mode in MODES}

        # In flight at the deploy: finished on version 1, with version 1's steps.
        for mode, receipt in old.items():
            saga = settle(alice_api, operator_api, receipt)
            assert (saga["state"], saga["definition_version"]) == ("completed", V1[mode]), (mode, saga)
            actions = [s["name"] for s in saga["steps"] if s["kind"] == "action"]
            assert actions == [s.name for s in V1_MODES[mode].steps], (mode, actions)
            assert all(s["state"] in DONE for s in saga["steps"] if s["kind"] == "action"), saga["steps"]

        # Started after it: version 2.
        for mode, receipt in new.items():
            saga = settle(alice_api, operator_api, receipt)
            expected = V2_MODES[mode]
            assert (saga["state"], saga["definition_version"]) == ("completed", expected.label), (mode, saga)
            assert saga["definition_hash"] == expected.digest
            actions = [s["name"] for s in saga["steps"] if s["kind"] == "action"]
            assert actions == [s.name for s in expected.steps], (mode, actions)
            assert all(s["state"] in DONE for s in saga["steps"] if s["kind"] == "action"), saga["steps"]

        # The operator retries the saga parked on version 1: it goes on with version 1's steps.
        response = operator_api.post(f"/api/sagas/{parked_id}/retry/", {"reason": "after the deploy"}, format="json")
        assert response.status_code == 202, response.content
        assert response.json()["definition_version"] == V1["orchestrated"]
        saga = settle(alice_api, operator_api, to_park)
        assert (saga["state"], saga["definition_version"]) == ("completed", V1["orchestrated"]), saga
        done = set(
            SagaStep.objects.using("default")
            .filter(saga_id=parked_id, state=SagaStep.State.SUCCEEDED)
            .values_list("name", flat=True)
        )
        assert {"mark_shipped", "notify_customer", "dispatch_shipment"} <= done
        assert not done & {"check_order", "ship_order"}

        # The saga API shows each saga's version; every saga is one of the two.
        listed = operator_api.get("/api/sagas/").json()
        rows = listed["results"] if isinstance(listed, dict) else listed
        assert {r["definition_version"] for r in rows} == {*V1.values(), *(d.label for d in V2_MODES.values())}
        assert Saga.objects.using("default").filter(definition_hash="").count() == 0
        assert run_audit() == []
        assert stale_versions() == []  # each content has its own label
    finally:
        wait_until_quiet()
        for worker in (v1, v2):
            if worker is not None:
                worker.stop()
