"""Alert delivery: rules evaluated by beat, grouped notifications, and their delivery to e-mail
and signed HTTP webhooks.

Each evaluation (`evaluate`, the `orchestration.evaluate_alerts` beat task) asks every rule what
is wrong now, as a list of `Firing`: one per rule and cause (its `key`), with the count of things
affected. A new key opens an `AlertGroup` and notifies every channel; a key still firing after
`ALERT_REPEAT_INTERVAL` is notified again; a group whose key no longer fires is resolved and a
"resolved" notification goes out. 500 sagas parked by the same cause are one group with a count.

A notification to a channel is an `AlertDelivery` row written with an outbox message, in the
evaluation's transaction: the `orchestration.deliver_alert` task sends it, and on failure writes
its next attempt to the outbox with an exponential backoff (the relay publishes it when due).
After `ALERT_DELIVERY_MAX_ATTEMPTS` the delivery is recorded as failed. The body follows
Alertmanager's webhook payload; webhooks are signed with the Standard Webhooks scheme, and the
delivery's id is the `webhook-id` of every attempt, so a receiver recognises a retried delivery.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import logging
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

from django.conf import settings
from django.core.exceptions import ValidationError
from django.core.mail import send_mail
from django.core.validators import URLValidator, validate_email
from django.db import connections, transaction
from django.db.models import Count, Min
from standardwebhooks.webhooks import Webhook

from sagaplatform.kernel import outbox
from sagaplatform.kernel.clock import db_now
from sagaplatform.observability import hooks as observability

from .models import Alert, AlertChannel, AlertDelivery, AlertGroup, Saga, SagaEvent, SagaStep

logger = logging.getLogger(__name__)

DB = "default"
DELIVER_TASK = "orchestration.deliver_alert"
SEVERITIES = ("info", "warning", "critical")
ACTIVE = (Saga.State.RUNNING, Saga.State.COMPENSATING, Saga.State.CONFIRMING)
NO_END = "0001-01-01T00:00:00Z"  # Alertmanager's endsAt of an alert still firing


@dataclass
class Firing:
    rule: str
    labels: dict
    count: int
    summary: str
    description: str
    severity: str = "warning"

    @property
    def key(self) -> str:
        return ":".join([self.rule, *(f"{k}={v}" for k, v in sorted(self.labels.items()))])[:200]


@dataclass(frozen=True)
class Rule:
    name: str
    check: Callable[[datetime], list[Firing]]
    runbook: str  # the anchor of its section in docs/OPERATIONS.md
    description: str = field(default="")


def runbook_url(rule: str) -> str:
    return f"{settings.ALERT_RUNBOOK_BASE}#{RULES[rule].runbook}" if rule in RULES else settings.ALERT_RUNBOOK_BASE


# --- The rules ---------------------------------------------------------------------------------


def saga_parked(now) -> list[Firing]:
    """Parked sagas, grouped by the step that stopped them (definition and step)."""
    bad = (SagaStep.State.FAILED, SagaStep.State.COMPENSATION_FAILED, SagaStep.State.CONFIRM_FAILED)
    rows = (
        SagaStep.objects.using(DB)
        .filter(saga__state=Saga.State.PARKED, state__in=bad)
        .values("saga__definition", "name")
        .annotate(n=Count("saga_id", distinct=True))
        .order_by()
    )
    firing = []
    counted = 0
    for row in rows:
        counted += row["n"]
        firing.append(
            Firing(
                "saga_parked",
                {"definition": row["saga__definition"], "step": row["name"]},
                row["n"],
                f"{row['n']} {row['saga__definition']} saga(s) parked at {row['name']}",
                f"{row['n']} saga(s) of {row['saga__definition']} are parked because {row['name']} keeps "
                "failing; they wait for an operator (fix the cause, then retry them).",
                "critical",
            )
        )
    others = Saga.objects.using(DB).filter(state=Saga.State.PARKED).exclude(steps__state__in=bad).count()
    if others:
        firing.append(
            Firing(
                "saga_parked",
                {"definition": "*", "step": "engine"},
                others,
                f"{others} saga(s) parked by the engine",
                "The engine could not handle these sagas (an unknown definition or step); see their timelines.",
                "critical",
            )
        )
    return firing


def saga_stuck(now) -> list[Firing]:
    """Sagas still running past their deadline (plus a grace the sweeper normally needs)."""
    rows = (
        Saga.objects.using(DB)
        .filter(state__in=ACTIVE, deadline_at__lte=now - timedelta(seconds=settings.ALERT_STUCK_GRACE))
        .values("definition")
        .annotate(n=Count("id"))
        .order_by()
    )
    return [
        Firing(
            "saga_stuck",
            {"definition": row["definition"]},
            row["n"],
            f"{row['n']} {row['definition']} saga(s) stuck past their deadline",
            "These sagas outlived their deadline and nothing decided them: is the sweeper (beat) running?",
            "critical",
        )
        for row in rows
    ]


def step_failure_rate(now) -> list[Firing]:
    """Steps whose final failures (retries exhausted, not business refusals) over the window are
    above ALERT_FAILURE_RATE of their starts, with at least ALERT_FAILURE_MIN_STEPS starts."""
    since = now - timedelta(seconds=settings.ALERT_FAILURE_WINDOW)
    events = SagaEvent.objects.using(DB).filter(created_at__gte=since)
    started = {
        (r["saga__definition"], r["step"]): r["n"]
        for r in events.filter(kind="step_started")
        .values("saga__definition", "step")
        .annotate(n=Count("id"))
        .order_by()
    }
    failed = (
        events.filter(kind="step_failed", data__reason="retries_exhausted")
        .values("saga__definition", "step")
        .annotate(n=Count("id"))
        .order_by()
    )
    firing = []
    for row in failed:
        total = started.get((row["saga__definition"], row["step"]), 0)
        if total < settings.ALERT_FAILURE_MIN_STEPS:
            continue
        rate = row["n"] / total
        if rate > settings.ALERT_FAILURE_RATE:
            minutes = settings.ALERT_FAILURE_WINDOW / 60
            firing.append(
                Firing(
                    "step_failure_rate",
                    {"definition": row["saga__definition"], "step": row["step"]},
                    row["n"],
                    f"{row['step']} failed finally in {rate:.0%} of {total} starts (last {minutes:g} min)",
                    f"{row['n']} of {total} {row['step']} steps of {row['saga__definition']} ran out of retries "
                    f"in the last {minutes:g} minutes (threshold {settings.ALERT_FAILURE_RATE:.0%}).",
                    "warning",
                )
            )
    return firing


def outbox_backlog(now) -> list[Firing]:
    """A database's outbox holds a due message unpublished for longer than ALERT_OUTBOX_AGE."""
    from sagaplatform.kernel.models import OutboxMessage

    firing = []
    for alias in settings.DATABASE_ALIASES:
        limit = db_now(alias) - timedelta(seconds=settings.ALERT_OUTBOX_AGE)
        late = OutboxMessage.objects.using(alias).filter(published_at__isnull=True, available_at__lte=limit)
        found = late.aggregate(n=Count("id"), oldest=Min("available_at"))
        if found["n"]:
            age = (limit - found["oldest"]).total_seconds() + settings.ALERT_OUTBOX_AGE
            firing.append(
                Firing(
                    "outbox_backlog",
                    {"database": alias},
                    found["n"],
                    f"{found['n']} message(s) unpublished in the {alias} outbox (oldest {age:.0f} s)",
                    f"The {alias} outbox holds {found['n']} due message(s) older than "
                    f"{settings.ALERT_OUTBOX_AGE:g} s: the broker is unreachable or no relay runs.",
                    "critical",
                )
            )
    return firing


def no_live_worker(now) -> list[Firing]:
    """A service queue that no live instance consumes (from the service registry)."""
    from sagaplatform.kernel import registry

    instances = registry.snapshot_view()["instances"]
    served = {queue for i in instances if i["alive"] for queue in i["queues"]}
    return [
        Firing(
            "no_live_worker",
            {"queue": queue},
            1,
            f"No live instance of {registry.service_of(queue)} consumes the {queue} queue",
            f"No live instance of {registry.service_of(queue)} is registered: its steps wait (up to "
            f"SAGA_NO_WORKER_WAIT_LIMIT) and commands for {queue} wait in its queue. Start a worker for it "
            f"(`celery -A sagaplatform worker -Q {queue}`).",
            "critical",
        )
        for queue in settings.SAGA_QUEUES
        if queue not in served
    ]


def dead_letters(now) -> list[Firing]:
    """Messages a worker dead-lettered and no operator has dealt with yet."""
    n = Alert.objects.using(DB).filter(kind=Alert.Kind.DEAD_LETTER, resolved_at__isnull=True).count()
    if not n:
        return []
    return [
        Firing(
            "dead_letter",
            {},
            n,
            f"{n} dead-lettered message(s) to look at",
            "Workers recorded messages they could not run (see Dead letters in the admin).",
            "warning",
        )
    ]


def breaker_open(now) -> list[Firing]:
    """A circuit breaker that refuses calls (open, or half-open while it probes)."""
    from sagaplatform.kernel import breakers

    return [
        Firing(
            "breaker_open",
            {"breaker": name},
            1,
            f"The {name} circuit breaker is {state['state'].replace('_', '-')}",
            f"Calls to {name} failed too often: its steps wait instead of failing, and resume spread "
            f"over {settings.BREAKER_RESUME_SPREAD:g} s once its probes succeed. Opened {state['opened']} time(s).",
            "critical",
        )
        for name, state in breakers.states().items()
        if state["state"] != breakers.CLOSED
    ]


RULES: dict[str, Rule] = {
    rule.name: rule
    for rule in (
        Rule("saga_parked", saga_parked, "saga-parked"),
        Rule("saga_stuck", saga_stuck, "saga-stuck"),
        Rule("step_failure_rate", step_failure_rate, "step-failure-rate"),
        Rule("outbox_backlog", outbox_backlog, "outbox-backlog"),
        Rule("no_live_worker", no_live_worker, "no-live-worker"),
        Rule("dead_letter", dead_letters, "dead-letter"),
        Rule("breaker_open", breaker_open, "breaker-open"),
    )
}


def register(rule: Rule) -> None:
    """Add a rule (circuit breakers, the service registry register theirs)."""
    RULES[rule.name] = rule


# --- Channels and their validation (the admin form and the API share these) --------------------


def validate_target(kind: str | None, target: str | None) -> str:
    target = (target or "").strip()
    if not target:
        raise ValidationError("Required.")
    if kind == AlertChannel.Kind.WEBHOOK:
        try:
            URLValidator(schemes=["http", "https"])(target)
        except ValidationError:
            raise ValidationError("Enter an http:// or https:// URL.") from None
        return target
    if kind == AlertChannel.Kind.EMAIL:
        addresses = [a.strip() for a in target.split(",") if a.strip()]
        if not addresses or len(addresses) > 20:
            raise ValidationError("Enter between 1 and 20 e-mail addresses, separated by commas.")
        for address in addresses:
            try:
                validate_email(address)
            except ValidationError:
                raise ValidationError(f"{address!r} is not an e-mail address.") from None
        return ", ".join(addresses)
    raise ValidationError(f"Unknown kind {kind!r}.")


def validate_secret(secret: str) -> str:
    """A Standard Webhooks secret: `whsec_` and at least 24 bytes, base64."""
    secret = (secret or "").strip()
    if not secret.startswith("whsec_"):
        raise ValidationError("A signing secret starts with whsec_ (leave it empty to generate one).")
    try:
        raw = base64.b64decode(secret[len("whsec_") :], validate=True)
    except (binascii.Error, ValueError):
        raise ValidationError("The part after whsec_ must be base64.") from None
    if len(raw) < 24:
        raise ValidationError("The secret must hold at least 24 random bytes.")
    return secret


def sync_env_channels() -> None:
    """Keep the channels configured by the environment (`env-email`, `env-webhook`) as it says."""
    wanted = {
        "env-email": (AlertChannel.Kind.EMAIL, settings.ALERT_EMAIL_TO, ""),
        "env-webhook": (AlertChannel.Kind.WEBHOOK, settings.ALERT_WEBHOOK_URL, settings.ALERT_WEBHOOK_SECRET),
    }
    for name, (kind, target, secret) in wanted.items():
        if target:
            AlertChannel.objects.using(DB).update_or_create(
                name=name,
                defaults={"kind": kind, "target": target, "secret": secret, "enabled": True, "source": "env"},
            )
        else:
            AlertChannel.objects.using(DB).filter(name=name, source="env").update(enabled=False)


# --- Evaluation --------------------------------------------------------------------------------


def evaluate(*, rules: list[str] | None = None) -> dict:
    """Run the rules, open, repeat and resolve groups, and queue their notifications."""
    sync_env_channels()
    selected = [RULES[name] for name in (rules or list(RULES))]
    now = db_now(DB)
    firing: dict[str, tuple[Rule, Firing]] = {}
    for rule in selected:
        try:
            for found in rule.check(now):
                firing[found.key] = (rule, found)
        except Exception:
            # One broken rule must not silence the others; its open groups stay as they are.
            logger.exception("alert rule %s failed", rule.name)
            selected = [r for r in selected if r is not rule]
    result = {"fired": 0, "repeated": 0, "resolved": 0, "firing": len(firing)}
    repeat = timedelta(seconds=settings.ALERT_REPEAT_INTERVAL)
    with transaction.atomic(using=DB):
        if not _evaluation_lock():
            return {**result, "skipped": True}  # another evaluation runs now
        open_groups = {
            g.key: g
            for g in AlertGroup.objects.using(DB)
            .select_for_update()
            .filter(status=AlertGroup.Status.FIRING, rule__in=[r.name for r in selected])
        }
        for key, (rule, found) in firing.items():
            group = open_groups.pop(key, None)
            if group is None:
                group = AlertGroup(key=key, rule=rule.name, started_at=now, labels=found.labels)
                result["fired"] += 1
                notify = True
            else:
                notify = group.last_notified_at is None or now - group.last_notified_at >= repeat
                result["repeated"] += notify
            group.severity, group.count = found.severity, found.count
            group.summary, group.description = found.summary[:300], found.description
            group.runbook_url, group.updated_at = runbook_url(rule.name), now
            if notify:
                group.last_notified_at = now
            group.save(using=DB)
            if notify:
                _notify(group, now)
        for group in open_groups.values():
            group.status, group.resolved_at, group.updated_at = AlertGroup.Status.RESOLVED, now, now
            group.last_notified_at = now
            group.save(using=DB)
            _notify(group, now)
            result["resolved"] += 1
    if result["fired"] or result["resolved"] or result["repeated"]:
        logger.info("alerts: %s", result)
    return result


def _evaluation_lock() -> bool:
    connection = connections[DB]
    if connection.vendor != "postgresql":
        return True
    with connection.cursor() as cursor:
        cursor.execute("SELECT pg_try_advisory_xact_lock(%s)", [0x5A6A_A1E7])
        return cursor.fetchone()[0]


def _notify(group: AlertGroup, now: datetime) -> None:
    level = SEVERITIES.index(group.severity) if group.severity in SEVERITIES else 1
    for channel in AlertChannel.objects.using(DB).filter(enabled=True):
        floor = SEVERITIES.index(channel.min_severity) if channel.min_severity in SEVERITIES else 1
        if level < floor:
            continue
        delivery = AlertDelivery.objects.using(DB).create(
            group=group, channel=channel, status=group.status, payload=payload(group, channel.name)
        )
        outbox.enqueue(
            using=DB, task=DELIVER_TASK, queue="orchestrator", payload={"delivery": str(delivery.id), "attempt": 1}
        )


def payload(group: AlertGroup, receiver: str) -> dict:
    """Alertmanager's webhook payload (version 4), one alert per group, with the count."""
    labels = {"alertname": group.rule, "severity": group.severity, **{k: str(v) for k, v in group.labels.items()}}
    annotations = {
        "summary": group.summary,
        "description": group.description,
        "runbook_url": group.runbook_url,
        "count": str(group.count),
    }
    return {
        "version": "4",
        "groupKey": group.key,
        "truncatedAlerts": 0,
        "status": group.status,
        "receiver": receiver,
        "groupLabels": {"alertname": group.rule, **{k: str(v) for k, v in group.labels.items()}},
        "commonLabels": labels,
        "commonAnnotations": annotations,
        "externalURL": settings.ALERT_EXTERNAL_URL,
        "count": group.count,
        "alerts": [
            {
                "status": group.status,
                "labels": labels,
                "annotations": annotations,
                "startsAt": group.started_at.isoformat(),
                "endsAt": group.resolved_at.isoformat() if group.resolved_at else NO_END,
                "generatorURL": settings.ALERT_EXTERNAL_URL,
                "fingerprint": hashlib.sha256(group.key.encode()).hexdigest()[:16],
            }
        ],
    }


# --- Delivery ----------------------------------------------------------------------------------


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args, **kwargs):
        return None  # a redirect is an answer that is not 2xx: retried, never followed


_opener = urllib.request.build_opener(_NoRedirect)


def deliver(*, delivery_id: str, attempt: int) -> str | None:
    """Send one attempt of a delivery. A duplicate or stale message (the outbox may publish one
    twice) finds the attempt already made and does nothing. Returns the delivery's state."""
    with transaction.atomic(using=DB):
        delivery = (
            AlertDelivery.objects.using(DB)
            .select_for_update(skip_locked=True)
            .select_related("channel")
            .filter(id=delivery_id)
            .first()
        )
        if delivery is None or delivery.state != AlertDelivery.State.PENDING or delivery.attempts != attempt - 1:
            return None
        now = db_now(DB)
        code, error = _send(delivery)
        delivery.attempts, delivery.last_status_code, delivery.last_error = attempt, code, error[:500]
        if not error:
            delivery.state, delivery.finished_at, delivery.next_attempt_at = AlertDelivery.State.DELIVERED, now, None
        elif attempt >= settings.ALERT_DELIVERY_MAX_ATTEMPTS:
            delivery.state, delivery.finished_at, delivery.next_attempt_at = AlertDelivery.State.FAILED, now, None
            logger.error(
                "alert delivery %s to %s failed after %s attempts: %s",
                delivery.webhook_id,
                delivery.channel.name,
                attempt,
                error,
            )
        else:
            delay = min(settings.ALERT_DELIVERY_BACKOFF * 2 ** (attempt - 1), settings.ALERT_DELIVERY_BACKOFF_MAX)
            delivery.next_attempt_at = now + timedelta(seconds=delay)
            outbox.enqueue(
                using=DB,
                task=DELIVER_TASK,
                queue="orchestrator",
                payload={"delivery": str(delivery.id), "attempt": attempt + 1},
                delay=delay,
                now=now,
            )
        delivery.save(using=DB)
        final = delivery.state != AlertDelivery.State.PENDING
        observability.alert_delivery(delivery.channel.name, ok=not error, final=final)  # once committed
        return delivery.state


def _send(delivery: AlertDelivery) -> tuple[int | None, str]:
    """One attempt: (HTTP status or None, error or "")."""
    channel = delivery.channel
    try:
        if channel.kind == AlertChannel.Kind.EMAIL:
            _send_email(delivery)
            return None, ""
        return _post(delivery)
    except Exception as error:  # whatever goes wrong is this attempt's failure, never the worker's
        return None, f"{type(error).__name__}: {error}"


def _post(delivery: AlertDelivery) -> tuple[int | None, str]:
    body = json.dumps(delivery.payload, separators=(",", ":"), sort_keys=True)
    now = datetime.now(UTC)
    headers = {
        "Content-Type": "application/json",
        "User-Agent": "sagaplatform-alerts",
        "webhook-id": delivery.webhook_id,
        "webhook-timestamp": str(int(now.timestamp())),
        "webhook-signature": Webhook(delivery.channel.secret).sign(delivery.webhook_id, now, body),
    }
    target = validate_target(AlertChannel.Kind.WEBHOOK, delivery.channel.target)  # http(s) only, never file:
    request = urllib.request.Request(target, data=body.encode(), headers=headers, method="POST")  # noqa: S310
    try:
        with _opener.open(request, timeout=settings.ALERT_WEBHOOK_TIMEOUT) as response:
            return response.status, ""
    except urllib.error.HTTPError as error:
        return error.code, f"HTTP {error.code}"


def _send_email(delivery: AlertDelivery) -> None:
    p = delivery.payload
    annotations = p["commonAnnotations"]
    status = "RESOLVED" if p["status"] == "resolved" else p["commonLabels"].get("severity", "").upper()
    body = "\n".join(
        [
            annotations["description"],
            "",
            f"Status: {p['status']}",
            f"Count: {p['count']}",
            f"Labels: {', '.join(f'{k}={v}' for k, v in sorted(p['commonLabels'].items()))}",
            f"Started: {p['alerts'][0]['startsAt']}",
            f"Runbook: {annotations['runbook_url']}",
            f"Dashboard: {p['externalURL']}",
            f"Delivery: {delivery.webhook_id}",
        ]
    )
    recipients = [a.strip() for a in delivery.channel.target.split(",") if a.strip()]
    send_mail(f"[{status}] {annotations['summary']}", body, settings.DEFAULT_FROM_EMAIL, recipients)


def recent(limit: int = 8) -> list[dict]:
    """The latest groups and their deliveries' states (the dashboard's alerts panel)."""
    groups = list(AlertGroup.objects.using(DB).order_by("-updated_at")[:limit])
    states: dict = {}
    for row in (
        AlertDelivery.objects.using(DB)
        .filter(group__in=groups)
        .values("group_id", "state")
        .annotate(n=Count("id"))
        .order_by()
    ):
        states.setdefault(row["group_id"], {})[row["state"]] = row["n"]
    return [
        {
            "id": g.id,
            "rule": g.rule,
            "severity": g.severity,
            "status": g.status,
            "summary": g.summary,
            "count": g.count,
            "runbook_url": g.runbook_url,
            "started_at": g.started_at.isoformat(),
            "resolved_at": g.resolved_at.isoformat() if g.resolved_at else None,
            "deliveries": states.get(g.id, {}),
        }
        for g in groups
    ]
