"""The Prometheus alert rules (deploy/prometheus/alerts.yml) load and fire as their unit tests
say (deploy/prometheus/alerts.test.yml), with Debian's promtool (.ci/run installs it)."""

from __future__ import annotations

import os
import shutil
import subprocess

import pytest

from tests.processes import ROOT

RULES = ROOT / "deploy" / "prometheus"


@pytest.fixture(scope="module")
def promtool() -> str:
    path = shutil.which("promtool")
    if path is None:
        if os.environ.get("CI") == "true":
            pytest.fail("promtool is missing (apt-get install prometheus)")
        pytest.skip("promtool is not installed (apt-get install prometheus)")
    return path


def run(promtool: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([promtool, *args], cwd=RULES, capture_output=True, text=True, timeout=60)


def test_the_alert_rules_are_valid(promtool):
    result = run(promtool, "check", "rules", "alerts.yml")
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_alert_rules_pass_their_unit_tests(promtool):
    result = run(promtool, "test", "rules", "alerts.test.yml")
    assert result.returncode == 0, result.stdout + result.stderr


def test_every_alert_has_a_runbook_in_the_operations_guide():
    import yaml

    rules = yaml.safe_load((RULES / "alerts.yml").read_text())["groups"][0]["rules"]
    guide = (ROOT / "docs" / "OPERATIONS.md").read_text()
    for rule in rules:
        anchor = rule["annotations"]["runbook"].split("#", 1)[1]
        assert f"### {rule['alert']}" in guide, rule["alert"]
        assert anchor == rule["alert"].lower(), rule["alert"]
