from celery import shared_task

from sagaplatform.kernel import batching, choreography

execute = batching.command_task("shipping")


@shared_task(name="shipping.react", ignore_result=True)
def react(message: dict) -> None:
    choreography.react(service="shipping", message=message)
