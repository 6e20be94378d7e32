from celery import shared_task

from . import engine, sweeper


@shared_task(name="orchestration.start_saga", ignore_result=True)
def start_saga(message: dict) -> None:
    engine.saga_start(saga_id=message["saga_id"], definition=message["definition"], context=message["context"])


@shared_task(name="orchestration.handle_reply", ignore_result=True)
def handle_reply(message: dict) -> None:
    engine.reply_handle(reply=message)


@shared_task(name="orchestration.sweep", ignore_result=True)
def sweep() -> dict:
    return sweeper.sweep_once()
