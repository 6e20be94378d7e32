"""Shared fixtures: personas, a catalogue, and an in-test broker that delivers outbox messages.

The in-test broker replaces only the last hop (handing a published message to Celery): the
outbox rows, the after-commit publishing and the task bodies all run for real, so a test sees
exactly the messages the platform would send, in order, and can drop, hold or duplicate them.
"""

from __future__ import annotations

import functools
import os
from decimal import Decimal
from pathlib import Path

import pytest
from django.conf import settings
from django.contrib.auth import get_user_model
from django.db import connections
from rest_framework.test import APIClient

from inventory.models import StockItem
from orders.models import Product
from sagaplatform.celery import app as celery_app
from sagaplatform.kernel import batching, commands, faults, outbox
from sagaplatform.settings import FAST_PASSWORD_HASHERS
from tests import fast_flush

ON_POSTGRES = not settings.EMBEDDED_DATABASES

CATALOGUE = {
    "SKU-MUG": (Decimal("12.50"), 50),
    "SKU-BOOK": (Decimal("44.00"), 20),
    "SKU-LAMP": (Decimal("39.00"), 10),
}

ADDRESS = {"name": "Alice Martin", "line1": "1 rue de Rivoli", "city": "Paris", "postal_code": "75001", "country": "FR"}


def order_body(*, token: str = "tok_visa", items: list[dict] | None = None) -> dict:
    return {
        "items": items or [{"sku": "SKU-MUG", "quantity": 2}],
        "payment": {"token": token},
        "shipping_address": dict(ADDRESS),
    }


def mug() -> tuple[int, int]:
    """SKU-MUG's (on hand, reserved)."""
    item = StockItem.objects.using("inventory").get(sku="SKU-MUG")
    return item.on_hand, item.reserved


def deliver_until(broker: InTestBroker, task: str) -> None:
    """Deliver messages until the next one would be `task` (which stays queued). Delayed
    messages fall due once nothing else is queued."""
    while (broker.queue or broker.release_delayed()) and broker.queue[0]["task"] != task:
        broker.run(broker.queue.pop(0))


def pytest_configure(config):
    # The SQLite test databases are files under var/ (WAL needs files); a fresh clone has none.
    settings.VAR_DIR.mkdir(parents=True, exist_ok=True)
    # PBKDF2 costs a third of a second a hash here and the suite creates hundreds of users. The
    # processes the tests start (servers, workers) inherit the variable and accept these hashes.
    os.environ["SAGA_INSECURE_FAST_PASSWORDS"] = "true"
    settings.PASSWORD_HASHERS = FAST_PASSWORD_HASHERS
    # Circuit breakers off unless a test turns them on (tests/unit/ops/test_breakers.py): the suite's many
    # injected failures would otherwise open them and defer the steps the tests watch fail. The
    # processes the tests start inherit the variable.
    os.environ["BREAKER_ENABLED"] = "false"
    settings.BREAKER_ENABLED = False
    # Service discovery off likewise (tests/unit/ops/test_registry.py, tests/e2e/test_registry_processes.py turn it on): the in-test broker and
    # most test workers register no instance for some services, whose steps would then wait.
    os.environ["SAGA_REGISTRY_DISCOVERY"] = "false"
    settings.SAGA_REGISTRY_DISCOVERY = False
    if ON_POSTGRES:
        # The in-process tests run the engine and the services as the workers do, with prepared
        # statements (DATABASE_PREPARED_STATEMENTS, on in workers only); the processes the tests
        # start keep their own defaults.
        for database in settings.DATABASES.values():
            database["OPTIONS"].update(settings.PREPARED_STATEMENT_OPTIONS)
        fast_flush.install()
        # The test databases need no durable commits: a commit does not wait for its WAL to
        # reach the disk (what survives a crash is still consistent, and a crash ends the run).
        # The processes the tests start keep the setting they would have in production.
        for alias in settings.DATABASES:
            connections[alias].settings_dict["OPTIONS"]["options"] = "-c synchronous_commit=off"


# The slow tiers, by directory: every test under tests/<tier>/ gets the tier's marker and `slow`
# (`make test-fast` runs `-m "not slow"`: no child process, no browser); the chaos tier's also
# `serial` (`make test` runs those alone, one at a time: they restart PostgreSQL, kill workers and
# time their recovery).
TIERS = ("e2e", "chaos", "browser")
TESTS = Path(__file__).resolve().parent


@pytest.hookimpl(tryfirst=True)  # before `-m` deselects by marker
def pytest_collection_modifyitems(config, items):
    for item in items:
        path = item.path.resolve()
        parts = path.relative_to(TESTS).parts if path.is_relative_to(TESTS) else ()
        if parts and parts[0] in TIERS:
            item.add_marker(parts[0])
            item.add_marker("slow")
            if parts[0] == "chaos":
                item.add_marker("serial")
            # On xdist workers (`make test`, `--dist loadgroup`), a file's tests run on one worker
            # (several share a stack started once per module), and every browser test on one
            # (they share one stack and one Chromium, started once per package).
            item.add_marker(pytest.mark.xdist_group("browser" if parts[0] == "browser" else "/".join(parts)))
    skip_pg = pytest.mark.skip(reason="needs PostgreSQL (set DATABASE_URL; `make test` does when it answers)")
    skip_prod = pytest.mark.skip(reason="needs PostgreSQL and Redis (DATABASE_URL, REDIS_URL)")
    for item in items:
        if "postgres" in item.keywords and not ON_POSTGRES:
            item.add_marker(skip_pg)
        if "production" in item.keywords and (not ON_POSTGRES or settings.EMBEDDED_BROKER):
            item.add_marker(skip_prod)


class InTestBroker:
    """Collects what the outbox publishes; `deliver()` runs the tasks, as a worker would."""

    def __init__(self) -> None:
        self.queue: list[dict] = []
        self.delivered: list[dict] = []

    def publish(self, message) -> None:
        self.queue.append(
            {"id": str(message.id), "task": message.task, "queue": message.queue, "payload": message.payload}
        )

    def run(self, message: dict) -> None:
        self.delivered.append(message)
        task = celery_app.tasks[message["task"]]
        if isinstance(task, batching.Batched):
            task.deliver([message["payload"]])
        else:
            task.run(message["payload"])

    def deliver(self, *, limit: int = 1000, skip: tuple[str, ...] = ()) -> int:
        """Deliver messages (and those they cause) until none is left. Returns how many ran.

        Once nothing else is queued, time passes: delayed messages (retries, handling windows)
        fall due and the relay publishes them. Messages for tasks in `skip` (for example the
        e-mail delivery) are left queued.
        """
        count = 0
        held = []
        while count < limit and (self.queue or self.release_delayed()):
            message = self.queue.pop(0)
            if message["task"] in skip:
                held.append(message)
                continue
            self.run(message)
            count += 1
        self.queue[:0] = held
        return count

    def release_delayed(self) -> int:
        """Make every delayed outbox row due now and relay it. Returns how many were published."""
        from sagaplatform.kernel.clock import db_now
        from sagaplatform.kernel.models import OutboxMessage

        released = 0
        for alias in settings.DATABASE_ALIASES:
            waiting = OutboxMessage.objects.using(alias).filter(published_at__isnull=True, delayed=True)
            if waiting.update(available_at=db_now(alias)):
                released += outbox.relay_due(using=alias)
        return released

    def take(self, task: str) -> list[dict]:
        """Remove and return the queued messages for `task` (to hold, reorder or duplicate them)."""
        taken = [m for m in self.queue if m["task"] == task]
        self.queue = [m for m in self.queue if m["task"] != task]
        return taken


@functools.cache
def register_tasks() -> None:
    """Import the task modules, as a worker start does. Once per process: the signal it sends
    also makes Celery's Django fixup run every system check, 4% of the fast tier's CPU when each
    test did it."""
    celery_app.loader.import_default_modules()


@pytest.fixture
def broker(monkeypatch) -> InTestBroker:
    register_tasks()
    fake = InTestBroker()
    monkeypatch.setattr(outbox, "_send", fake.publish)
    return fake


@pytest.fixture
def catalogue(django_db_blocker) -> dict:
    # One statement per database (most tests ask for it: a get-or-create per row cost 3% of the
    # fast tier). A test starts with empty tables; a row already there is overwritten.
    Product.objects.using("orders").bulk_create(
        [Product(sku=sku, name=sku.title(), unit_price=price) for sku, (price, _) in CATALOGUE.items()],
        update_conflicts=True,
        unique_fields=["sku"],
        update_fields=["name", "unit_price"],
    )
    StockItem.objects.using("inventory").bulk_create(
        [StockItem(sku=sku, on_hand=stock) for sku, (_, stock) in CATALOGUE.items()],
        update_conflicts=True,
        unique_fields=["sku"],
        update_fields=["on_hand"],
    )
    return CATALOGUE


@pytest.fixture
def alice(django_user_model):
    return django_user_model.objects.create_user("alice", "alice@example.com", "alice-pass")


@pytest.fixture
def bob(django_user_model):
    return django_user_model.objects.create_user("bob", "bob@example.com", "bob-pass")


@pytest.fixture
def alice_api(alice) -> APIClient:
    client = APIClient()
    client.force_authenticate(alice)
    return client


@pytest.fixture
def bob_api(bob) -> APIClient:
    client = APIClient()
    client.force_authenticate(bob)
    return client


@pytest.fixture(autouse=True)
def _test_settings(settings):
    settings.EMAIL_BACKEND = "django.core.mail.backends.locmem.EmailBackend"
    settings.SMS_BACKEND = "notifications.sms.MemorySmsBackend"
    # The parcel leaves at once unless a test opens the handling window itself.
    settings.SHIPPING_HANDLING_SECONDS = 0
    # Fault rules are cached for a second per process: forget the last test's.
    faults.clear_cache()
    # How long each operation took to run, learnt by this process: a drain's parallel steps
    # are published while it knows none of them (`outbox._fanned_out`), as in a fresh worker.
    commands.forget_run_times()
    # No worker runs in-process, so every order a test places stays pending: admission would
    # refuse its 51st. Admission has its own tests (tests/unit/api/test_web_load.py).
    settings.ORDERS_MAX_PENDING = 0


def make_user(username: str, *, staff: bool = False):
    return get_user_model().objects.create_user(username, f"{username}@example.com", f"{username}-pass", is_staff=staff)


@pytest.fixture(autouse=True)
def _fresh_throttle_counts(monkeypatch):
    """Every test counts its API requests from zero: user ids repeat from one test to the next,
    and in production mode the default cache is Redis, shared with every other test process."""
    import uuid

    from django.core.cache.backends.locmem import LocMemCache

    from sagaplatform.api import ScopedThrottle

    monkeypatch.setattr(ScopedThrottle, "cache", LocMemCache(f"throttle-{uuid.uuid4()}", {}))


def make_operator(username: str = "ops"):
    """Staff with the permission to operate sagas (retry, skip, cancel)."""
    from django.contrib.auth.models import Permission

    user = make_user(username, staff=True)
    user.user_permissions.add(Permission.objects.get(content_type__app_label="orchestration", codename="operate_saga"))
    return get_user_model().objects.get(pk=user.pk)  # a fresh instance: permissions are cached


@pytest.fixture
def operator():
    return make_operator()


@pytest.fixture
def operator_api(operator) -> APIClient:
    client = APIClient()
    client.force_authenticate(operator)
    return client
