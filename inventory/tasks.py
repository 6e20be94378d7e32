from celery import shared_task

from sagaplatform.kernel import choreography, commands


@shared_task(name="inventory.execute", ignore_result=True)
def execute(message: dict) -> None:
    commands.execute(service="inventory", message=message)


@shared_task(name="inventory.react", ignore_result=True)
def react(message: dict) -> None:
    choreography.react(service="inventory", message=message)
