"""`manage.py faults` reaches the orchestrator's own kill points as well as the services'."""

from __future__ import annotations

from io import StringIO

import pytest
from django.core.management import CommandError, call_command

from sagaplatform.kernel import faults
from sagaplatform.kernel.models import FaultRule

pytestmark = pytest.mark.django_db(databases="__all__")


def faults_command(*args: str) -> str:
    out = StringIO()
    call_command("faults", *args, stdout=out)
    return out.getvalue()


def test_the_orchestrator_is_a_target_whose_rules_live_in_its_own_database():
    faults_command("add", "orchestrator.relay", "--crash-point", "before_commit", "--crashes", "2")
    faults_command("add", "payments.charge", "--fail-first", "1")

    rule = FaultRule.objects.using("default").get()
    assert (rule.service, rule.operation, rule.crash_point, rule.crashes_left) == (
        "orchestrator",
        "relay",
        "before_commit",
        2,
    )
    faults.clear_cache()
    assert [r.pk for r in faults.rules_for(faults.ORCHESTRATOR)] == [rule.pk]
    listed = faults_command("list")
    assert f"orchestrator#{rule.id} " in listed
    assert "payments#" in listed

    assert faults_command("clear", "orchestrator") == "cleared 1 rule(s) of orchestrator\n"
    assert not FaultRule.objects.using("default").exists()
    assert FaultRule.objects.using("payments").count() == 1
    with pytest.raises(CommandError, match="unknown service 'billing'"):
        faults_command("add", "billing.charge")
