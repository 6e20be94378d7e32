from celery import shared_task

from sagaplatform.kernel import commands


@shared_task(name="inventory.execute", ignore_result=True)
def execute(message: dict) -> None:
    commands.execute(service="inventory", message=message)
