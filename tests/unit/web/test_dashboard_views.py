"""The dashboard page itself (the shell the websocket fills): who may open it, what it tells the
script, and that every asset it loads is really there (a missing vendored file would only show
as a blank graph in a browser)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from django.conf import settings
from django.contrib.staticfiles import finders

from tests.conftest import make_operator, make_user

pytestmark = pytest.mark.django_db

URL = "/dashboard/"
STATIC_DIR = Path(settings.BASE_DIR) / "static"


def test_anonymous_visitors_are_sent_to_the_login_page(client):
    response = client.get(URL)

    assert response.status_code == 302
    assert response["Location"] == f"{settings.LOGIN_URL}?next={URL}"


def test_a_customer_is_refused_with_a_page_that_says_why(client):
    client.force_login(make_user("carol"))

    response = client.get(URL)

    assert response.status_code == 403
    body = response.content.decode()
    assert "for staff" in body
    assert "carol" in body
    assert 'id="dashboard"' not in body  # none of the operator's page is served


def test_an_operator_gets_the_dashboard_able_to_act(client):
    client.force_login(make_operator("olga"))

    response = client.get(URL)

    assert response.status_code == 200
    assert "dashboard/index.html" in [t.name for t in response.templates]
    body = response.content.decode()
    assert 'data-ws-path="/ws/dashboard/"' in body
    assert 'data-can-operate="true"' in body
    assert "read-only" not in body
    for action in ("cancel", "retry", "skip"):
        assert f'data-action="{action}"' in body


def test_staff_without_the_operate_permission_see_a_read_only_dashboard(client):
    client.force_login(make_user("sam", staff=True))

    response = client.get(URL)

    assert response.status_code == 200
    body = response.content.decode()
    assert 'data-can-operate="false"' in body
    assert "read-only" in body


def test_an_inactive_staff_account_cannot_open_it(client):
    user = make_user("gone", staff=True)
    client.force_login(user)
    user.is_active = False
    user.save()

    assert client.get(URL).status_code == 302  # the session no longer authenticates


def test_every_asset_the_page_loads_exists_and_scripts_import_only_existing_modules(client):
    client.force_login(make_operator("olga"))
    body = client.get(URL).content.decode()

    prefix = "/" + settings.STATIC_URL.strip("/") + "/"
    assets = re.findall(rf'(?:src|href)="{re.escape(prefix)}([^"]+)"', body)
    for expected in (
        "vendor/cytoscape/cytoscape.min.js",
        "vendor/cytoscape-dagre/cytoscape-dagre.js",
        "dashboard/dashboard.js",
        "dashboard/dashboard.css",
    ):
        assert expected in assets
    for asset in assets:
        assert finders.find(asset), f"{asset} is referenced by the page but not found"

    # The entry module's imports, followed transitively: a typo in a relative import is a blank
    # page in the browser and nothing anywhere else.
    seen: set[Path] = set()
    pending = [STATIC_DIR / "dashboard" / "dashboard.js"]
    while pending:
        module = pending.pop()
        if module in seen:
            continue
        seen.add(module)
        assert module.is_file(), f"{module} is imported but missing"
        for target in re.findall(r'^import .* from "(\./[^"]+)";', module.read_text(), flags=re.M):
            pending.append((module.parent / target).resolve())
    assert {p.name for p in seen} >= {"dashboard.js", "feed.js", "list.js", "sagagraph.js", "platform.js", "charts.js"}


def test_vendored_libraries_carry_their_licences_and_versions():
    readme = (STATIC_DIR / "vendor" / "README.md").read_text()
    for library, version in (("cytoscape", "3.34.4"), ("cytoscape-dagre", "4.0.1")):
        assert f"{library} {version}" in readme or f"{library}@{version}" in readme
        assert (STATIC_DIR / "vendor" / library / "LICENSE").is_file()
    # The minified file is the release it claims to be.
    assert '"3.34.4"' in (STATIC_DIR / "vendor" / "cytoscape" / "cytoscape.min.js").read_text()
