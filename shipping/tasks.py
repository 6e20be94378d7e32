from celery import shared_task

from sagaplatform.kernel import choreography, commands


@shared_task(name="shipping.execute", ignore_result=True)
def execute(message: dict) -> None:
    commands.execute(service="shipping", message=message)


@shared_task(name="shipping.react", ignore_result=True)
def react(message: dict) -> None:
    choreography.react(service="shipping", message=message)
