from celery import shared_task

from sagaplatform.kernel import batching, choreography

execute = batching.command_task("inventory")


@shared_task(name="inventory.react", ignore_result=True)
def react(message: dict) -> None:
    choreography.react(service="inventory", message=message)
