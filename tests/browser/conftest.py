"""Browser tests: the platform served by real processes on the test databases, driven by headless
Chromium through Playwright.

The stack is what production runs, against the databases pytest-django created for this session:

* with PostgreSQL and Redis (`make test` when they answer): `manage.py serve` (daphne: HTTP and
  websockets, channels_redis layer) as a subprocess on the test databases, plus a real
  `celery worker -B` process (tests.processes.Worker) on the Redis broker;
* embedded (SQLite): `manage.py serve` with its in-process worker threads, its var/ directory
  pointing at the SQLite test database files.

Test modules mark themselves `pytest.mark.django_db(transaction=True, databases="__all__")`: the
data a test writes must be committed for the server processes to see it, and is flushed after
the test. Use the `page` fixture (a fresh browser context per test, its base URL the server's),
`login(page, username, password)` and `screenshot(page, name)`.

Chromium is Debian's (`apt-get install chromium`), never `playwright install`. Without
/usr/bin/chromium (or CHROMIUM_PATH) the tests are skipped, unless CI=true, where they fail.
"""

from __future__ import annotations

import os
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from django.conf import settings
from django.db import connections

try:
    from playwright.sync_api import expect  # re-exported: test modules import it from here
except ImportError:  # skipped below with the reason (or, on CI, failed)
    expect = None  # type: ignore[assignment]

from loadtest.feed_bench import CHROMIUM, CHROMIUM_ARGS  # one definition for tests and benchmark
from loadtest.processes import Process, serve_command
from tests.processes import ARTIFACTS, ROOT, Worker, database_urls, flush_broker, free_port, wait_for, wait_until_quiet

# One place whatever the xdist worker (every browser test runs on the same one).
SCREENSHOTS = ROOT / "test-artifacts" / "screenshots"
# Long enough for a browser test to cancel in, short enough for the happy path to wait out.
HANDLING_SECONDS = "4"
PRODUCTION = not settings.EMBEDDED_DATABASES and not settings.EMBEDDED_BROKER
SETTLED = {"completed", "compensated", "cancelled", "failed", "parked"}


def _on_ci() -> bool:
    return os.environ.get("CI", "").lower() == "true"


def pytest_collection_modifyitems(config, items):
    # Playwright and Chromium are checked here rather than at import so that the skip reason is
    # clear, and so that CI, where a browser test silently skipped would prove nothing, fails.
    reason = None
    if expect is None:
        reason = "needs playwright (pip install -r requirements-dev.txt)"
    if reason is None and not Path(CHROMIUM).exists():
        reason = f"needs Chromium at {CHROMIUM} (apt-get install chromium)"
    if reason is None or _on_ci():
        return
    here = Path(__file__).parent
    for item in items:
        if here in Path(item.fspath).parents:
            item.add_marker(pytest.mark.skip(reason=reason))


@dataclass
class LiveStack:
    """The running platform: `url` is the base URL the browser talks to."""

    url: str
    mode: str
    processes: list = field(default_factory=list)

    def log(self, name: str = "web") -> str:
        return (ARTIFACTS / f"browser-{name}.log").read_text()


def _embedded_var_dir(tmp: Path) -> Path:
    """A var/ directory whose `<alias>.sqlite3` are the test databases' files, so the embedded
    server (which only knows var/<alias>.sqlite3) opens the databases this session created."""
    var = tmp / "var"
    var.mkdir(parents=True, exist_ok=True)
    for alias in settings.DATABASE_ALIASES:
        (var / f"{alias}.sqlite3").symlink_to(Path(connections[alias].settings_dict["NAME"]).resolve())
    return var


def _healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(url + "/healthz", timeout=2) as response:
            return response.status == 200
    except OSError:
        return False


def start_stack(tmp: Path, *, extra_env: dict | None = None) -> LiveStack:
    """Start the web process (and, in production mode, a worker) on the test databases."""
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DATABASE_URL", "REDIS_URL", "CELERY_BROKER"))}
    env |= {
        "DJANGO_SETTINGS_MODULE": "sagaplatform.settings",
        "SHIPPING_HANDLING_SECONDS": HANDLING_SECONDS,
        "SAGA_SWEEP_INTERVAL": "1",
        # A retry scheduled a minute out would keep the broker busy long after a test ends
        # (an operator retry does not withdraw it), and the next test waits for quiet.
        "SAGA_RETRY_MAX_INTERVAL_OVERRIDE": "2",
        "LOG_LEVEL": "INFO",
        **(extra_env or {}),
    }
    stack = LiveStack(url="", mode="production" if PRODUCTION else "embedded")
    if PRODUCTION:
        flush_broker()
        env |= database_urls() | {"REDIS_URL": settings.REDIS_URL, "SAGA_EMBEDDED_WORKER": "false"}
        worker = Worker(
            name="browser",
            extra_env={
                "SHIPPING_HANDLING_SECONDS": HANDLING_SECONDS,
                "SAGA_RETRY_MAX_INTERVAL_OVERRIDE": env["SAGA_RETRY_MAX_INTERVAL_OVERRIDE"],
                **(extra_env or {}),
            },
        ).start()
        stack.processes.append(worker)
    else:
        env["SAGA_VAR_DIR"] = str(_embedded_var_dir(tmp))
    port = free_port()
    log_path = ARTIFACTS / "browser-web.log"
    log_path.unlink(missing_ok=True)
    web = Process("the web process", serve_command(port=port), env=env, log_path=log_path).start()
    stack.processes.append(web)
    stack.url = f"http://127.0.0.1:{port}"
    try:
        web.wait_until(lambda: _healthy(stack.url), timeout=60, message=f"/healthz (log: {log_path})")
    except BaseException:
        stop_stack(stack)
        raise
    return stack


def stop_stack(stack: LiveStack) -> None:
    for process in reversed(stack.processes):
        process.stop()


@pytest.fixture(scope="package")
def live_stack(django_db_setup, django_db_blocker, tmp_path_factory) -> Iterator[LiveStack]:
    """One stack for the browser tests; every test's data is flushed after it, the processes stay."""
    stack = start_stack(tmp_path_factory.mktemp("browser-stack"))
    yield stack
    stop_stack(stack)


def _sagas_settled() -> bool:
    from orchestration.models import Saga

    return not Saga.objects.using("default").exclude(state__in=SETTLED).exists()


@pytest.fixture
def settle_after(live_stack):
    """After the test, wait for its sagas to come to rest before pytest-django flushes the
    databases: a saga still running would otherwise meet its rows gone (and the next test's)."""
    yield
    try:
        wait_for(_sagas_settled, timeout=30, interval=0.2, message="the test's sagas to settle")
    finally:
        if PRODUCTION:
            wait_until_quiet()
        time.sleep(0.2)


@pytest.fixture(scope="package")
def browser():
    """Debian's headless Chromium. Playwright's sync API runs an event loop in this thread, so
    Django's async-safety check would refuse the ORM calls the tests make between page actions.
    Package-scoped: that loop must be gone before later tests use `async_to_sync`."""
    if not Path(CHROMIUM).exists():
        pytest.fail(f"CI=true and no Chromium at {CHROMIUM} (apt-get install chromium)")
    from playwright.sync_api import sync_playwright

    previous = os.environ.get("DJANGO_ALLOW_ASYNC_UNSAFE")
    os.environ["DJANGO_ALLOW_ASYNC_UNSAFE"] = "true"
    playwright = sync_playwright().start()
    chromium = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
    try:
        yield chromium
    finally:
        chromium.close()
        playwright.stop()
        if previous is None:
            os.environ.pop("DJANGO_ALLOW_ASYNC_UNSAFE", None)
        else:
            os.environ["DJANGO_ALLOW_ASYNC_UNSAFE"] = previous


@pytest.fixture
def page(browser, live_stack, settle_after):
    """A fresh context (no cookies) per test; relative URLs go to the live stack."""
    context = browser.new_context(base_url=live_stack.url, viewport={"width": 1200, "height": 900})
    context.set_default_timeout(15_000)
    page = context.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    page.js_errors = errors  # tests may assert that the page's scripts ran without an error
    yield page
    context.close()


def login(page, username: str, password: str) -> None:
    """Log in through the login form, as a person would."""
    page.goto("/accounts/login/")
    page.get_by_label("Username").fill(username)
    page.get_by_label("Password").fill(password)
    with page.expect_navigation():
        page.get_by_role("button", name="Log in").click()
    if "/accounts/login/" in page.url:
        raise AssertionError(f"login as {username} failed: still on {page.url}")


def screenshot(page, name: str) -> Path:
    """Save a full-page PNG under test-artifacts/screenshots/ (look at them)."""
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    path = SCREENSHOTS / f"{name}.png"
    page.screenshot(path=str(path), full_page=True)
    return path
