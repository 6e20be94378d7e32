"""The README as a newcomer copies it: every command runs as written, and the production path
has a way to create the users its own examples log in with."""

from __future__ import annotations

import base64
import json
import re

import pytest
from django.core.management import call_command, get_commands
from django.test import Client

from orders.models import Order
from tests.processes import ROOT

README = (ROOT / "README.md").read_text()
MAKEFILE = (ROOT / "Makefile").read_text()


def test_every_manage_py_command_runs_with_the_virtualenvs_python():
    """`python3 manage.py ...` fails with "No module named django": the packages are in .venv."""
    bare = [m.start() for m in re.finditer(r"manage\.py", README) if README[: m.start()][-17:] != ".venv/bin/python "]
    assert bare == [], [README[i - 30 : i + 30] for i in bare]
    named = set(re.findall(r"\.venv/bin/python manage\.py\s+([a-z_]+)", README))
    assert named - set(get_commands()) == set()
    assert "create_user" in named


def test_every_make_target_in_the_readme_exists():
    targets = set(re.findall(r"^([a-z][a-z-]*):", MAKEFILE, flags=re.M))
    used = set(re.findall(r"`make ([a-z][a-z-]*)", README)) | set(
        re.findall(r"^make ([a-z][a-z-]*)", README, flags=re.M)
    )
    assert used - targets == set()


@pytest.mark.django_db(transaction=True, databases="__all__")
def test_the_production_path_creates_users_that_the_readmes_curl_logs_in_with(settings, monkeypatch, broker):
    """With DJANGO_DEBUG off and no demo data: the catalogue, a customer and an operator from the
    README's own commands, then the README's order (its curl body) placed as that customer."""
    settings.DEBUG = False
    monkeypatch.setenv("SAGA_USER_PASSWORD", "a-long-enough-secret-9")
    call_command("seed_demo", "--catalogue-only")
    call_command("create_user", "alice")
    call_command("create_user", "ops", "--operator")
    body = json.loads(re.search(r"-d '(\{\"items\".*?)' \\", README)[1])
    auth = "Basic " + base64.b64encode(b"alice:a-long-enough-secret-9").decode()

    response = Client().post(
        "/api/orders/", body, content_type="application/json", HTTP_AUTHORIZATION=auth, HTTP_IDEMPOTENCY_KEY="first"
    )

    assert response.status_code == 202, response.content
    assert Order.objects.using("orders").count() == 1
    ops = "Basic " + base64.b64encode(b"ops:a-long-enough-secret-9").decode()
    assert Client().get("/api/sagas/", HTTP_AUTHORIZATION=ops).status_code == 200
    assert Client().get("/api/sagas/", HTTP_AUTHORIZATION=auth).status_code == 403  # a customer is not staff
