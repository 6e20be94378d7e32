"""Versioned saga definitions and event schemas, in process: the snapshot of a definition
rebuilds to the same content hash, a saga resolves its own version, an unknown version is a
recorded error, the check catches a definition changed under a label in use, and an event no
reaction accepts (unversioned, malformed, of another schema) is parked as a dead letter with an
alert instead of being run or dropped. `tests/e2e/test_definition_versions_e2e.py` proves the whole
with real workers across a deploy."""

from __future__ import annotations

import uuid
from dataclasses import replace

import pytest
from django.core.checks import Error
from django.core.management import call_command
from django.core.management.base import SystemCheckError
from django.utils import timezone
from rest_framework.test import APIClient

from orchestration import checks, definitions, engine, live
from orchestration.deadletters import alert_dead_letters
from orchestration.definitions import SagaDefinition, UnknownDefinitionVersion
from orchestration.models import Alert, DefinitionSnapshot, Saga, SagaStep
from payments.models import Charge
from sagaplatform.kernel import choreography, events
from sagaplatform.kernel.models import Barrier, DeadLetter, OutboxMessage
from tests import definitions_changed
from tests.conftest import make_operator

pytestmark = pytest.mark.django_db(databases="__all__")

CONTEXT = {"order_id": str(uuid.uuid4()), "mode": "orchestrated", "items": [], "amount": "1.00"}


@pytest.mark.parametrize("mode", sorted(definitions.MODES))
def test_a_snapshot_rebuilds_the_same_definition(mode):
    definition = definitions.MODES[mode]
    rebuilt = SagaDefinition.from_graph(definition.graph())
    assert rebuilt.digest == definition.digest
    assert [s.name for s in rebuilt.steps] == [s.name for s in definition.steps]
    assert rebuilt.step("charge_payment") == definition.step("charge_payment")
    assert definition.label == f"{definition.name} v1"
    # A snapshot written by other code: a field since removed is left out, one added takes its default.
    older = definition.graph()
    older["retired"] = True
    older["steps"][0]["retired"] = 1
    del older["steps"][0]["timeout"], older["steps"][0]["retry"]["jitter"]
    # Each caller gets a copy of its own: the definition's graph (and so its digest) is unchanged.
    assert "retired" not in definition.graph()
    assert "timeout" in definition.graph()["steps"][0]
    rebuilt = SagaDefinition.from_graph(older)
    assert (rebuilt.steps[0].timeout, rebuilt.steps[0].retry.jitter) == (30.0, True)
    changed = definitions_changed.modes(dict(definitions.MODES))[mode]
    assert (changed.label, changed.digest != definition.digest) == (f"{definition.name} v2", True)


def test_a_saga_records_its_version_and_keeps_it_after_the_code_changes(monkeypatch):
    saga_id = uuid.uuid4()
    engine.saga_start(saga_id=saga_id, definition="place_order", context=CONTEXT)
    saga = Saga.objects.using("default").get(id=saga_id)
    v1 = definitions.PLACE_ORDER
    assert (saga.definition_hash, saga.definition_label) == (v1.digest, "place_order v1")
    assert DefinitionSnapshot.objects.using("default").get(digest=v1.digest).graph == v1.graph()

    v2 = definitions_changed.modes(dict(definitions.MODES))["orchestrated"]
    monkeypatch.setitem(definitions.DEFINITIONS, "place_order", v2)
    monkeypatch.setattr(definitions, "_LOADED", {})
    resolved = definitions.for_saga(saga)
    assert resolved is not v1
    assert resolved.digest == v1.digest
    assert [s.name for s in resolved.steps] == [s.name for s in v1.steps]
    # The engine reads it too: an advance on the new code finds every step of the old graph.
    engine.saga_advance(saga_id=saga_id)
    # The dashboard's header names the version and brings the old graph along.
    header = live.saga_header(saga, SagaStep.objects.using("default").filter(saga=saga), now=timezone.now())
    assert (header["definition_version"], header["definition_hash"]) == ("place_order v1", v1.digest)
    assert [s["name"] for s in header["definition_graph"]["steps"]] == [s.name for s in v1.steps]
    assert header["definition_graph"]["digest"] == v1.digest
    # A new saga takes the new version.
    engine.saga_start(saga_id=uuid.uuid4(), definition="place_order", context=CONTEXT)
    assert Saga.objects.using("default").filter(definition_label="place_order v2").count() == 1


def test_an_unknown_version_is_a_recorded_error_and_parks_the_saga(monkeypatch):
    saga_id = uuid.uuid4()
    engine.saga_start(saga_id=saga_id, definition="place_order", context=CONTEXT)
    Saga.objects.using("default").filter(id=saga_id).update(definition_hash="f" * 64)
    monkeypatch.setattr(definitions, "_LOADED", {})
    with pytest.raises(UnknownDefinitionVersion, match="no saga definition version place_order ffffffffffff"):
        engine.saga_advance(saga_id=saga_id)
    # Read views still show it; an operator action on it is a clear 409, not a 500.
    operator = make_operator()
    api = APIClient()
    api.force_authenticate(operator)
    detail = api.get(f"/api/sagas/{saga_id}/")
    assert detail.status_code == 200
    assert [s["name"] for s in detail.json()["steps"]][:2] == ["reserve_stock", "charge_payment"]
    header = live.saga_header(Saga.objects.using("default").get(id=saga_id), [], now=timezone.now())
    assert header["definition_version"] == "place_order v1"
    refused = api.post(f"/api/sagas/{saga_id}/cancel/", {"reason": "test"}, format="json")
    assert refused.status_code == 409, refused.content
    assert refused.json()["code"] == "unknown_definition_version"
    # The sweeper's answer to a saga the engine fails on: parked, with an alert.
    assert engine.saga_park_broken(saga_id=saga_id, error=UnknownDefinitionVersion("gone"))
    assert Saga.objects.using("default").get(id=saga_id).state == Saga.State.PARKED
    assert Alert.objects.using("default").filter(saga_id=saga_id, kind=Alert.Kind.SAGA_PARKED).exists()


def test_the_check_fails_on_a_definition_changed_under_a_label_a_running_saga_uses():
    saga_id = uuid.uuid4()
    engine.saga_start(saga_id=saga_id, definition="place_order", context=CONTEXT)
    assert checks.stale_versions() == []
    call_command("check", databases=["default"])
    # The same label, other content: what the code said when this saga started.
    older = replace(definitions.PLACE_ORDER, description="before the change", _index={})
    definitions.record(older)
    Saga.objects.using("default").filter(id=saga_id).update(definition_hash=older.digest)

    [problem] = checks.definition_versions(databases=["default"])
    assert isinstance(problem, Error)
    assert problem.id == "orchestration.E001"
    assert "place_order v1 changed" in problem.msg
    assert "1 unfinished saga(s)" in problem.msg
    with pytest.raises(SystemCheckError):
        call_command("check", databases=["default"])
    assert checks.definition_versions(databases=None) == []  # only with --database

    # Once no saga runs the old content any more, the label is free again.
    Saga.objects.using("default").filter(id=saga_id).update(state=Saga.State.COMPLETED)
    assert checks.stale_versions() == []


def reaction_message(event: str, reaction: str, **changes) -> dict:
    message = choreography.event_message(event=event, saga_id=uuid.uuid4(), context=dict(CONTEXT))
    return {**message, "reaction": reaction, "attempt": 1, **changes}


def test_every_event_carries_its_schema_version():
    message = choreography.event_message(event=events.ORDER_PLACED, saga_id=uuid.uuid4(), context={})
    assert message["schema"] == events.SCHEMA == 1
    assert all(events.SCHEMA in r.accepts for r in choreography.reactions())


@pytest.mark.parametrize(
    ("change", "reason", "error"),
    [
        ({"schema": None}, "malformed", "unversioned event 'order.placed' (no schema)"),
        ({"schema": 2}, "failed", "no live reaction accepts 'order.placed' schema 2: inventory:reserve_stock:action"),
        ({"reaction": "gone:action"}, "failed", "inventory has no reaction 'gone:action'"),
        ({"saga_id": "not-a-uuid"}, "malformed", "saga_id 'not-a-uuid' is not a UUID"),
        ({"context": "x"}, "malformed", "the event's context is not an object"),
    ],
)
def test_an_event_no_reaction_accepts_is_parked_and_alerted_not_run(change, reason, error):
    message = reaction_message(events.ORDER_PLACED, "reserve_stock:action")
    message = {k: v for k, v in {**message, **change}.items() if v is not None}

    assert choreography.react(service="inventory", message=message) == {"status": "parked"}

    letter = DeadLetter.objects.using("inventory").get()
    assert (letter.reason, letter.queue, letter.task) == (reason, "inventory", "inventory.react")
    assert error in letter.error
    assert not Barrier.objects.using("inventory").exists()  # not run
    assert not OutboxMessage.objects.using("inventory").exists()  # no retry loop, nothing published
    assert alert_dead_letters() == 1
    assert error[:40] in Alert.objects.using("default").get(kind=Alert.Kind.DEAD_LETTER).message


def test_payments_makes_no_gateway_call_for_an_event_it_parks():
    from payments import tasks

    message = reaction_message(events.STOCK_RESERVED, "charge_payment:action", schema=99)
    tasks.react(message)
    assert not Charge.objects.using("payments").exists()
    assert "schema 99" in DeadLetter.objects.using("payments").get().error


def test_the_tracker_parks_an_unversioned_or_unknown_schema_event():
    unversioned = choreography.event_message(event=events.ORDER_PLACED, saga_id=uuid.uuid4(), context=CONTEXT)
    del unversioned["schema"]
    engine.track(message=unversioned)
    engine.track(message={**unversioned, "schema": 7})
    assert not Saga.objects.using("default").exists()
    assert sorted(DeadLetter.objects.using("default").values_list("reason", flat=True)) == ["failed", "malformed"]
    assert alert_dead_letters() == 2


def test_a_definition_removed_from_the_code_still_runs_its_sagas(monkeypatch):
    saga_id = uuid.uuid4()
    engine.saga_start(saga_id=saga_id, definition="place_order_parallel", context=CONTEXT)
    monkeypatch.delitem(definitions.DEFINITIONS, "place_order_parallel")
    monkeypatch.setattr(definitions, "_LOADED", {})
    with pytest.raises(LookupError):
        definitions.get_definition("place_order_parallel")  # no new saga can take it

    engine.saga_advance(saga_id=saga_id)
    saga = Saga.objects.using("default").get(id=saga_id)
    assert definitions.for_saga(saga).digest == definitions.PLACE_ORDER_PARALLEL.digest
    assert saga.state == Saga.State.RUNNING


def test_the_audit_reports_a_saga_whose_version_cannot_be_loaded(monkeypatch):
    from orchestration.audit import run_audit

    saga_id = uuid.uuid4()
    engine.saga_start(saga_id=saga_id, definition="place_order", context=CONTEXT)
    Saga.objects.using("default").filter(id=saga_id).update(definition_hash="e" * 64)
    monkeypatch.setattr(definitions, "_LOADED", {})
    rules = [finding.rule for finding in run_audit()]
    assert "unknown_definition_version" in rules
