"""`manage.py simulate` tells each violating saga in its output (all a CI run keeps): its style,
state and timeline, with what each observed event's emitter said."""

from __future__ import annotations

import io
import uuid

import pytest

from loadtest.simulate import report_violations, saga_story
from orchestration.audit import Violation
from tests.conftest import order_body

pytestmark = pytest.mark.django_db(transaction=True, databases="__all__")


def test_a_sagas_story_names_its_style_and_who_said_what(alice_api, catalogue, broker):
    receipt = alice_api.post("/api/orders/", {**order_body(), "mode": "choreography"}, format="json").json()
    broker.deliver()

    lines = saga_story(receipt["saga"]["id"])

    assert lines[0] == f"    saga {receipt['saga']['id']}: choreography, completed"
    captured = [line for line in lines if " event_observed " in line and " payment.captured " in line]
    assert len(captured) == 1
    assert captured[0].endswith("service=payments op=action status=succeeded")
    assert any(" saga_completed " in line for line in lines)


def test_a_saga_that_is_not_there_is_said_so():
    missing = uuid.uuid4()
    assert saga_story(str(missing)) == [f"    (no saga {missing})"]


def test_the_report_tells_the_first_violating_sagas_once_each(alice_api, catalogue, broker):
    sagas = []
    for _ in range(3):
        receipt = alice_api.post("/api/orders/", {**order_body(), "mode": "choreography"}, format="json").json()
        sagas.append(receipt["saga"]["id"])
    broker.deliver()
    first, second, third = sagas
    out = io.StringIO()

    report_violations(
        [
            Violation("money_not_captured", first, "completed saga with charge refunded"),
            Violation("barrier_incomplete", f"payments:{first}:charge_payment", "action has no stored outcome"),
            Violation("money_not_captured", second, "..."),
            Violation("money_not_captured", third, "..."),
        ],
        out,
    )

    lines = out.getvalue().splitlines()
    assert [line.split(":")[0] for line in lines if line.startswith("    saga ")] == [
        f"    saga {first}",
        f"    saga {second}",
    ]
    assert lines[0] == f"  VIOLATION money_not_captured: {first}: completed saga with charge refunded"
    assert lines[1] == f"    saga {first}: choreography, completed"
    assert sum(line.startswith("  VIOLATION ") for line in lines) == 4
    assert lines[-1] == "audit: 4 violation(s)"
