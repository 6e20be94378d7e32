"""Notification writes and delivery."""

from __future__ import annotations

import uuid
from datetime import timedelta

from django.core.mail import send_mail
from django.db import connections
from django.utils import timezone

from sagaplatform.kernel import barrier, outbox
from sagaplatform.kernel.clock import db_now

from . import sms
from .models import Notification

DB = "notifications"
DELIVER_TASK = "notifications.deliver"

TEMPLATES = {
    Notification.Kind.ORDER_CONFIRMED: (
        "Your order is on its way",
        "Good news: order {order_id} is confirmed and has left our warehouse.",
    ),
    Notification.Kind.ORDER_CANCELLED: (
        "Your order is cancelled",
        "Order {order_id} is cancelled as you asked. Anything you paid is refunded.",
    ),
    Notification.Kind.ORDER_FAILED: (
        "Your order could not be completed",
        "Sorry: order {order_id} could not be completed ({reason}). You have not been charged.",
    ),
}


def notification_queue(
    *, saga_id: uuid.UUID, order_id: str, kind: str, email: str, phone: str = "", reason: str = ""
) -> list[Notification]:
    """Write the customer's messages and, in the same transaction, the messages to deliver them:
    each notification inserted only if it is new (its order, kind and channel are unique), then
    the new ones' deliveries in one more statement (run inline: a notifications worker sends
    each right after this commit, no hop). Two round trips where a get_or_create and a second
    save per notification took six."""
    subject, template = TEMPLATES[kind]
    body = template.format(order_id=order_id, reason=reason or "unknown reason")
    created, deliveries = [], []
    with barrier.atomic(DB):
        for channel, recipient in ((Notification.Channel.EMAIL, email), (Notification.Channel.SMS, phone)):
            if not recipient:
                continue
            notification = Notification(
                saga_id=saga_id,
                order_id=order_id,
                kind=kind,
                channel=channel,
                recipient=recipient,
                subject=subject,
                body=body,
            )
            message = outbox.message(task=DELIVER_TASK, queue=DB, payload={"notification_id": str(notification.id)})
            notification.deliver_message_id = message.id
            if _insert_if_new(notification):
                deliveries.append(message)
            else:
                notification = Notification.objects.using(DB).get(order_id=order_id, kind=kind, channel=channel)
            created.append(notification)
        outbox.enqueue_many(using=DB, messages=deliveries, inline=True)
    return created


def _insert_if_new(notification: Notification) -> bool:
    """`INSERT ... ON CONFLICT DO NOTHING` of `notification`, its last attempt now on the
    database's clock, as its delivery's outbox row is due (SQLite shares the process's clock):
    whether it was new."""
    connection = connections[DB]
    quote = connection.ops.quote_name
    fields = [f for f in Notification._meta.concrete_fields if f.name != "last_attempt_at"]
    values = [f.get_db_prep_save(f.pre_save(notification, True), connection) for f in fields]
    if connection.vendor == "postgresql":
        now_sql = "STATEMENT_TIMESTAMP()"  # Django's Now(), the outbox row's due time
    else:
        now_sql = "%s"
        values.append(Notification._meta.get_field("last_attempt_at").get_db_prep_save(timezone.now(), connection))
    columns = ", ".join(quote(str(f.column)) for f in [*fields, Notification._meta.get_field("last_attempt_at")])
    placeholders = ", ".join(["%s"] * len(fields) + [now_sql])
    # Only the model's own quoted names are interpolated; every value is a parameter.
    sql = f"INSERT INTO {quote(Notification._meta.db_table)} ({columns}) VALUES ({placeholders}) ON CONFLICT DO NOTHING"  # noqa: S608
    with connection.cursor() as cursor:
        cursor.execute(sql, values)
        return bool(cursor.rowcount == 1)


def notification_deliver(*, notification_id: str) -> bool:
    """Send one queued notification. At least once: a crash between sending and marking it sent
    means it is sent again, which is the right side to err on for a customer message."""
    notification = Notification.objects.using(DB).filter(id=notification_id).first()
    if notification is None or notification.state == Notification.State.SENT:
        return False
    if notification.channel == Notification.Channel.EMAIL:
        send_mail(notification.subject, notification.body, None, [notification.recipient])
    else:
        sms.get_backend().send(to=notification.recipient, body=notification.body)
    Notification.objects.using(DB).filter(id=notification.id, state=Notification.State.QUEUED).update(
        state=Notification.State.SENT, sent_at=timezone.now()
    )
    return True


REDELIVER_AFTER = timedelta(seconds=30)


def notification_redeliver_queued() -> int:
    """Publish again the delivery of notifications still queued after a while (a lost message,
    a mail server that was down). Once per period each."""
    now = db_now(DB)
    stale = list(
        Notification.objects.using(DB)
        .filter(state=Notification.State.QUEUED, last_attempt_at__lte=now - REDELIVER_AFTER)
        .values_list("id", "deliver_message_id")[:500]
    )
    if not stale:
        return 0
    Notification.objects.using(DB).filter(id__in=[n for n, _ in stale]).update(last_attempt_at=now)
    return outbox.republish(using=DB, ids=[m for _, m in stale if m])
