from celery import shared_task

from sagaplatform.kernel import outbox

from . import deadletters, engine, sweeper
from .definitions import for_mode


@shared_task(name="orchestration.start_saga", ignore_result=True)
def start_saga(message: dict) -> None:
    definition = message.get("definition") or for_mode(message.get("mode", "orchestrated")).name
    engine.saga_start(saga_id=message["saga_id"], definition=definition, context=message["context"])


@shared_task(name="orchestration.handle_reply", ignore_result=True)
def handle_reply(message: dict) -> None:
    engine.reply_handle(reply=message)


def handle_replies(messages: list) -> list[bool]:
    """The replies of a batch of commands, applied where they committed (`outbox.BATCH_RUNNERS`):
    for each, whether it ran (a failed one is sent on as a message, to fail or not on its own)."""
    results = engine.reply_handle_many(
        replies=[message.payload for message in messages], contexts=[message.trace_context for message in messages]
    )
    return [result is not None for result in results]


outbox.BATCH_RUNNERS[handle_reply.name] = handle_replies


@shared_task(name="orchestration.track_event", ignore_result=True)
def track_event(message: dict) -> None:
    engine.track(message=message)


@shared_task(name="orchestration.sweep", ignore_result=True)
def sweep() -> dict:
    return sweeper.sweep_once()


@shared_task(name="orchestration.alert_dead_letters", ignore_result=True)
def alert_dead_letters() -> int:
    return deadletters.alert_dead_letters()


@shared_task(name="orchestration.evaluate_alerts", ignore_result=True)
def evaluate_alerts() -> dict:
    from . import alerting

    return alerting.evaluate()


@shared_task(name="orchestration.deliver_alert", ignore_result=True)
def deliver_alert(message: dict) -> None:
    from . import alerting

    alerting.deliver(delivery_id=message["delivery"], attempt=int(message["attempt"]))


@shared_task(name="orchestration.purge_sagas", ignore_result=True)
def purge_sagas() -> dict:
    """Apply SAGA_RETENTION_DAYS to the finished sagas' timeline (orchestration/retention.py)."""
    from . import retention

    return retention.purge()
