"""Notification writes and delivery."""

from __future__ import annotations

import uuid
from datetime import timedelta

from django.core.mail import send_mail
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
    """Write the customer's messages and, in the same transaction, the messages to deliver them."""
    subject, template = TEMPLATES[kind]
    body = template.format(order_id=order_id, reason=reason or "unknown reason")
    created = []
    with barrier.atomic(DB):
        for channel, recipient in ((Notification.Channel.EMAIL, email), (Notification.Channel.SMS, phone)):
            if not recipient:
                continue
            notification, is_new = Notification.objects.using(DB).get_or_create(
                order_id=order_id,
                kind=kind,
                channel=channel,
                defaults={"saga_id": saga_id, "recipient": recipient, "subject": subject, "body": body},
            )
            if is_new:
                # Inline: a notifications worker sends it right after this commit, no hop.
                message = outbox.enqueue(
                    using=DB,
                    task=DELIVER_TASK,
                    queue=DB,
                    payload={"notification_id": str(notification.id)},
                    inline=True,
                )
                notification.deliver_message_id, notification.last_attempt_at = message.id, message.available_at
                notification.save(using=DB, update_fields=["deliver_message_id", "last_attempt_at"])
            created.append(notification)
    return created


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
