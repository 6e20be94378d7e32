from django.db.models import QuerySet

from .models import Notification

DB = "notifications"


def notifications_for_order(*, order_id) -> QuerySet[Notification]:
    return Notification.objects.using(DB).filter(order_id=order_id)
