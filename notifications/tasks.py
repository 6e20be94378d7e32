from celery import shared_task

from sagaplatform.kernel import batching, choreography

from . import services

execute = batching.command_task("notifications")


@shared_task(name="notifications.deliver", ignore_result=True)
def deliver(message: dict) -> None:
    services.notification_deliver(notification_id=message["notification_id"])


@shared_task(name="notifications.redeliver_queued", ignore_result=True)
def redeliver_queued() -> int:
    return services.notification_redeliver_queued()


@shared_task(name="notifications.react", ignore_result=True)
def react(message: dict) -> None:
    choreography.react(service="notifications", message=message)
