from celery import shared_task

from sagaplatform.kernel import batching, choreography

from . import services

execute = batching.command_task("orders")


@shared_task(name="orders.reannounce_pending", ignore_result=True)
def reannounce_pending() -> int:
    return services.order_reannounce_pending()


@shared_task(name="orders.react", ignore_result=True)
def react(message: dict) -> None:
    choreography.react(service="orders", message=message)


@shared_task(name="orders.purge_idempotency_keys", ignore_result=True)
def purge_idempotency_keys() -> int:
    return services.idempotency_keys_purge()
