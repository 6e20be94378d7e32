"""Alert delivery: rules evaluated into grouped notifications, sent to a real local HTTP receiver
(signed with the Standard Webhooks scheme, retried with the same delivery id through the outbox,
recorded as failed after the last attempt) and by e-mail (Django's locmem backend); and the
channels' configuration in the API and the admin (validation, operators only, masked secrets)."""

from __future__ import annotations

import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from django.core import mail
from django.test import Client
from standardwebhooks.webhooks import Webhook

from orchestration import alerting, engine
from orchestration.models import AlertChannel, AlertDelivery, AlertGroup, Saga
from sagaplatform.kernel import faults
from sagaplatform.kernel.models import FaultRule
from tests.conftest import make_operator, make_user, order_body

pytestmark = pytest.mark.django_db(transaction=True, databases="__all__")

SECRET = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"


class Receiver:
    """An HTTP server on a free local port that answers 500 to the first `fail_first` requests
    and 204 after that, and keeps every request's headers and body."""

    def __init__(self, fail_first: int = 0) -> None:
        self.fail_first = fail_first
        self.requests: list[dict] = []
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = self.rfile.read(int(self.headers["Content-Length"]))
                receiver.requests.append({"headers": {k.lower(): v for k, v in self.headers.items()}, "body": body})
                self.send_response(500 if len(receiver.requests) <= receiver.fail_first else 204)
                self.end_headers()

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def verified(self) -> list[dict]:
        """Every request's body, after checking its signature as a receiver would."""
        return [Webhook(SECRET).verify(r["body"], r["headers"]) for r in self.requests]

    def ids(self) -> list[str]:
        return [r["headers"]["webhook-id"] for r in self.requests]


@pytest.fixture
def receiver():
    receivers = []

    def start(fail_first: int = 0) -> Receiver:
        receivers.append(Receiver(fail_first))
        return receivers[-1]

    yield start
    for r in receivers:
        r.server.shutdown()
        r.server.server_close()


def webhook(url: str, **fields) -> AlertChannel:
    return AlertChannel.objects.create(name="ops-hook", kind="webhook", target=url, secret=SECRET, **fields)


def park_orders(api, broker, n: int) -> list[str]:
    """`n` sagas parked by the same cause: shipping refuses for good, then every refund fails."""
    FaultRule.objects.using("payments").create(service="payments", operation="refund", failure_rate=1.0)
    FaultRule.objects.using("shipping").create(service="shipping", operation="schedule", fail_first=999)
    faults.clear_cache()
    ids = []
    for _ in range(n):
        response = api.post("/api/orders/", order_body(), format="json")
        assert response.status_code == 202, response.content
        ids.append(response.json()["saga"]["id"])
    broker.deliver()
    assert {Saga.objects.get(id=i).state for i in ids} == {"parked"}
    return ids


def unpark(ids: list[str], broker) -> None:
    FaultRule.objects.using("payments").all().delete()
    faults.clear_cache()
    for saga_id in ids:
        engine.saga_retry(saga_id=saga_id, actor="user:ops", reason="gateway fixed")
    broker.deliver()
    assert {Saga.objects.get(id=i).state for i in ids} == {"compensated"}


def test_a_webhook_failing_twice_gets_one_grouped_signed_delivery_then_the_resolution(
    alice_api, catalogue, broker, receiver, settings
):
    settings.ALERT_DELIVERY_MAX_ATTEMPTS = 5
    hook = receiver(fail_first=2)
    webhook(hook.url)
    ids = park_orders(alice_api, broker, 3)

    assert alerting.evaluate(rules=["saga_parked"])["fired"] == 1
    broker.deliver()  # attempt 1 and 2 fail (500); the outbox holds each retry until due

    bodies = hook.verified()  # raises unless every request is signed with the secret
    assert len(bodies) == 3
    assert len(set(hook.ids())) == 1, "a retried delivery carries the same webhook-id"
    delivery = AlertDelivery.objects.get()
    assert hook.ids()[0] == delivery.webhook_id
    assert (delivery.state, delivery.attempts, delivery.last_status_code) == ("delivered", 3, 204)
    body = bodies[-1]
    assert body["status"] == "firing"
    assert body["count"] == 3
    assert body["commonLabels"] == {
        "alertname": "saga_parked",
        "severity": "critical",
        "definition": "place_order",
        "step": "charge_payment",
    }
    assert body["commonAnnotations"]["runbook_url"].endswith("docs/OPERATIONS.md#saga-parked")
    assert body["alerts"][0]["endsAt"] == alerting.NO_END

    # Still firing, within the repeat interval: nothing new is sent.
    assert alerting.evaluate(rules=["saga_parked"])["repeated"] == 0
    broker.deliver()
    assert len(hook.requests) == 3

    unpark(ids, broker)
    assert alerting.evaluate(rules=["saga_parked"])["resolved"] == 1
    broker.deliver()
    resolved = hook.verified()[-1]
    assert resolved["status"] == "resolved"
    assert resolved["alerts"][0]["endsAt"] != alerting.NO_END
    assert hook.ids()[-1] != hook.ids()[0], "the resolution is a delivery of its own"
    group = AlertGroup.objects.get()
    assert (group.status, group.deliveries.count()) == ("resolved", 2)


def test_a_repeat_interval_sends_the_firing_group_again(alice_api, catalogue, broker, receiver, settings):
    settings.ALERT_REPEAT_INTERVAL = 0
    hook = receiver()
    webhook(hook.url)
    park_orders(alice_api, broker, 1)
    alerting.evaluate(rules=["saga_parked"])
    assert alerting.evaluate(rules=["saga_parked"])["repeated"] == 1
    broker.deliver()
    assert len(hook.verified()) == 2
    assert len(set(hook.ids())) == 2
    assert AlertGroup.objects.count() == 1


def test_a_delivery_that_keeps_failing_is_recorded_as_failed(alice_api, catalogue, broker, receiver, settings):
    settings.ALERT_DELIVERY_MAX_ATTEMPTS = 3
    hook = receiver(fail_first=99)
    webhook(hook.url)
    # Nothing listens on this port: refused at once, an error of the attempt, not of the worker.
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        closed = f"http://127.0.0.1:{s.getsockname()[1]}/"
    AlertChannel.objects.create(name="nobody", kind="webhook", target=closed, secret=SECRET)
    park_orders(alice_api, broker, 1)

    alerting.evaluate(rules=["saga_parked"])
    broker.deliver()

    assert len(hook.requests) == 3
    assert len(set(hook.ids())) == 1
    failed = {d.channel.name: d for d in AlertDelivery.objects.select_related("channel")}
    assert (failed["ops-hook"].state, failed["ops-hook"].attempts, failed["ops-hook"].last_status_code) == (
        "failed",
        3,
        500,
    )
    assert failed["nobody"].state == "failed"
    assert "Connection" in failed["nobody"].last_error
    assert AlertGroup.objects.get().status == "firing"


def test_the_delay_between_attempts_doubles(alice_api, catalogue, broker, receiver, settings):
    settings.ALERT_DELIVERY_BACKOFF = 2.0
    from sagaplatform.kernel.models import OutboxMessage

    hook = receiver(fail_first=99)
    webhook(hook.url)
    park_orders(alice_api, broker, 1)
    alerting.evaluate(rules=["saga_parked"])
    delivery = AlertDelivery.objects.get()
    delays = []
    for attempt in (1, 2, 3):
        alerting.deliver(delivery_id=str(delivery.id), attempt=attempt)
        retry = OutboxMessage.objects.filter(task=alerting.DELIVER_TASK, payload__attempt=attempt + 1).get()
        delays.append(round((retry.available_at - retry.created_at).total_seconds()))
    assert delays == [2, 4, 8]
    # A duplicate of an attempt already made (the outbox publishes at least once) does nothing.
    assert alerting.deliver(delivery_id=str(delivery.id), attempt=2) is None
    assert len(hook.requests) == 3


def test_e_mail_alerts_go_through_django_mail(alice_api, catalogue, broker):
    AlertChannel.objects.create(name="oncall", kind="email", target="oncall@example.com, lead@example.com")
    ids = park_orders(alice_api, broker, 2)
    mail.outbox.clear()

    alerting.evaluate(rules=["saga_parked"])
    broker.deliver()
    (message,) = mail.outbox
    assert message.subject == "[CRITICAL] 2 place_order saga(s) parked at charge_payment"
    assert message.to == ["oncall@example.com", "lead@example.com"]
    assert "Count: 2" in message.body
    assert "docs/OPERATIONS.md#saga-parked" in message.body

    unpark(ids, broker)
    mail.outbox.clear()
    alerting.evaluate(rules=["saga_parked"])
    broker.deliver()
    assert [m.subject for m in mail.outbox] == ["[RESOLVED] 2 place_order saga(s) parked at charge_payment"]
    assert AlertDelivery.objects.filter(state="delivered").count() == 2


def test_environment_channels_are_kept_in_step(settings, broker):
    settings.ALERT_EMAIL_TO = "oncall@example.com"
    alerting.sync_env_channels()
    channel = AlertChannel.objects.get(name="env-email")
    assert (channel.kind, channel.source, channel.enabled) == ("email", "env", True)
    settings.ALERT_EMAIL_TO = ""
    alerting.sync_env_channels()
    assert not AlertChannel.objects.get(name="env-email").enabled


def test_below_a_channels_minimum_severity_nothing_is_sent(settings, broker):
    from orchestration.models import Alert

    AlertChannel.objects.create(name="pager", kind="email", target="pager@example.com", min_severity="critical")
    Alert.objects.create(kind=Alert.Kind.DEAD_LETTER, message="unreadable")
    assert alerting.evaluate(rules=["dead_letter"])["fired"] == 1  # a warning
    assert not AlertDelivery.objects.exists()


def test_outbox_backlog_and_failure_rate_rules(settings, broker, alice_api, catalogue):
    from datetime import timedelta

    from sagaplatform.kernel.clock import db_now
    from sagaplatform.kernel.models import OutboxMessage

    settings.ALERT_OUTBOX_AGE = 30
    old = db_now("payments") - timedelta(seconds=120)
    OutboxMessage.objects.using("payments").create(task="x", queue="payments", payload={}, available_at=old)
    (found,) = alerting.outbox_backlog(db_now("default"))
    assert (found.labels, found.count) == ({"database": "payments"}, 1)

    settings.ALERT_FAILURE_MIN_STEPS = 1
    FaultRule.objects.using("payments").create(service="payments", operation="charge", failure_rate=1.0)
    faults.clear_cache()
    alice_api.post("/api/orders/", order_body(), format="json")
    broker.deliver()
    (rate,) = alerting.step_failure_rate(db_now("default"))
    assert rate.labels == {"definition": "place_order", "step": "charge_payment"}


# --- Configuration: the API and the admin --------------------------------------------------------


def test_the_api_validates_channels_and_never_shows_a_secret_back(operator_api, alice_api):
    bad = operator_api.post(
        "/api/alerts/channels/", {"name": "x", "kind": "webhook", "target": "ftp://example.com/"}, format="json"
    )
    assert bad.status_code == 400
    assert bad.json()["code"] == "invalid_channel"
    assert bad.json()["details"] == {"target": ["Enter an http:// or https:// URL."]}
    for body in (
        {"name": "x", "kind": "email", "target": "not-an-address"},
        {"name": "x", "kind": "webhook", "target": "https://example.com/", "secret": "plain"},
        {"name": "x", "kind": "webhook", "target": "javascript:alert(1)"},
        {"name": "env-x", "kind": "email", "target": "a@example.com"},
        {"name": "x", "kind": "sms", "target": "a@example.com"},
    ):
        assert operator_api.post("/api/alerts/channels/", body, format="json").status_code == 400, body

    created = operator_api.post(
        "/api/alerts/channels/", {"name": "hook", "kind": "webhook", "target": "https://example.com/h"}, format="json"
    )
    assert created.status_code == 201, created.content
    secret = created.json()["secret"]
    assert secret.startswith("whsec_")
    assert alerting.validate_secret(secret)
    listed = operator_api.get("/api/alerts/channels/").json()["results"][0]
    assert "secret" not in listed
    assert listed["secret_hint"] == f"whsec_…{secret[-4:]}"
    assert secret not in operator_api.get(f"/api/alerts/channels/{listed['id']}/").content.decode()

    taken = operator_api.post(
        "/api/alerts/channels/", {"name": "hook", "kind": "email", "target": "a@example.com"}, format="json"
    )
    assert taken.status_code == 409
    changed = operator_api.patch(
        f"/api/alerts/channels/{listed['id']}/", {"target": "file:///etc/passwd"}, format="json"
    )
    assert changed.status_code == 400
    assert alice_api.get("/api/alerts/channels/").status_code == 403
    assert alice_api.post("/api/alerts/channels/", {}, format="json").status_code == 403


def test_the_notifications_api_lists_groups_with_their_deliveries(operator_api, broker):
    from orchestration.models import Alert

    AlertChannel.objects.create(name="oncall", kind="email", target="oncall@example.com")
    Alert.objects.create(kind=Alert.Kind.DEAD_LETTER, message="unreadable")
    alerting.evaluate(rules=["dead_letter"])
    broker.deliver()
    (group,) = operator_api.get("/api/alerts/notifications/").json()["results"]
    assert group["rule"] == "dead_letter"
    assert group["status"] == "firing"
    assert [(d["channel"], d["state"], d["attempts"]) for d in group["deliveries"]] == [("oncall", "delivered", 1)]


def test_the_admin_validates_channels_masks_secrets_and_is_for_operators():
    client = Client()
    client.force_login(make_operator("ops"))
    add = "/admin/orchestration/alertchannel/add/"
    form = {"name": "hook", "kind": "webhook", "target": "ftp://example.com/", "min_severity": "warning"}
    refused = client.post(add, {**form, "enabled": "on"})
    assert refused.status_code == 200
    assert "Enter an http:// or https:// URL." in refused.content.decode()
    weak = client.post(add, {**form, "target": "https://example.com/h", "new_secret": "whsec_c2hvcnQ="})
    assert "at least 24 random bytes" in weak.content.decode()

    saved = client.post(add, {**form, "target": "https://example.com/h", "new_secret": SECRET})
    assert saved.status_code == 302
    channel = AlertChannel.objects.get(name="hook")
    assert channel.secret == SECRET
    page = client.get(f"/admin/orchestration/alertchannel/{channel.pk}/change/").content.decode()
    assert SECRET not in page
    assert f"whsec_…{SECRET[-4:]}" in page
    # Saving without a new secret keeps the current one.
    client.post(f"/admin/orchestration/alertchannel/{channel.pk}/change/", {**form, "target": "https://example.com/2"})
    channel.refresh_from_db()
    assert (channel.target, channel.secret) == ("https://example.com/2", SECRET)

    staff = Client()
    staff.force_login(make_user("viewer", staff=True))
    assert staff.get(add).status_code == 403
    assert staff.get("/admin/orchestration/alertgroup/").status_code == 403
