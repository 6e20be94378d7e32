"""The notification service's writes: a customer gets one message per order, kind and channel,
however often it is asked for, and each new one goes out through the outbox with its row."""

from __future__ import annotations

import uuid

import pytest
from django.db import connections, transaction
from django.test.utils import CaptureQueriesContext

from notifications.models import Notification
from notifications.services import DELIVER_TASK, notification_queue
from sagaplatform.kernel.models import OutboxMessage

pytestmark = pytest.mark.django_db(databases="__all__")


def queue(order_id: uuid.UUID, **kwargs) -> list[Notification]:
    with transaction.atomic(using="notifications"):
        return notification_queue(
            saga_id=uuid.uuid4(), order_id=str(order_id), kind="order_confirmed", email="ann@example.com", **kwargs
        )


def test_each_new_notification_is_written_with_its_delivery_in_two_statements():
    order_id = uuid.uuid4()
    with CaptureQueriesContext(connections["notifications"]) as queries:
        first = queue(order_id, phone="+4917612345678")

    writes = [q["sql"].split()[0] for q in queries.captured_queries if q["sql"].startswith(("INSERT", "UPDATE"))]
    assert writes == ["INSERT", "INSERT", "INSERT"]  # e-mail, SMS, both deliveries
    rows = {n.channel: n for n in Notification.objects.using("notifications").filter(order_id=order_id)}
    assert set(rows) == {"email", "sms"}
    assert [n.id for n in first] == [rows["email"].id, rows["sms"].id]
    deliveries = OutboxMessage.objects.using("notifications").filter(task=DELIVER_TASK)
    assert {m.payload["notification_id"] for m in deliveries} == {str(n.id) for n in first}
    for notification in rows.values():
        message = deliveries.get(id=notification.deliver_message_id)
        assert notification.state == "queued"
        assert abs((notification.last_attempt_at - message.available_at).total_seconds()) < 1


def test_asking_again_writes_nothing_and_answers_with_the_same_notifications():
    order_id = uuid.uuid4()
    first = queue(order_id)

    again = queue(order_id)

    assert [n.id for n in again] == [n.id for n in first]
    assert Notification.objects.using("notifications").filter(order_id=order_id).count() == 1
    assert OutboxMessage.objects.using("notifications").filter(task=DELIVER_TASK).count() == 1
