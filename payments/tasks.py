from celery import shared_task

from sagaplatform.kernel import choreography, commands


@shared_task(name="payments.execute", ignore_result=True)
def execute(message: dict) -> None:
    commands.execute(service="payments", message=message)


@shared_task(name="payments.react", ignore_result=True)
def react(message: dict) -> None:
    choreography.react(service="payments", message=message)
