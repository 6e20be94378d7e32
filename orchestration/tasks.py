from typing import Any

from celery import shared_task
from django.conf import settings

from sagaplatform.kernel import batching, outbox

from . import deadletters, engine, sweeper
from .definitions import for_mode
from .engine.run import SagaId


def _start(message: dict) -> tuple[str, str, dict[str, Any]]:
    definition = message.get("definition") or for_mode(message.get("mode", "orchestrated")).name
    return message["saga_id"], definition, message["context"]


if settings.SAGA_BATCH_SIZE > 1:

    @shared_task(name="orchestration.start_saga", base=batching.Batched, bind=True, ignore_result=True)
    def start_saga(self, items: list[dict]) -> None:
        """Start messages, taken in batches (kernel/batching.py): one transaction for the batch."""
        starts: list[tuple[SagaId, str, dict[str, Any]]] = []
        contexts: list[dict[str, Any] | None] = []
        for item, context in zip(items, batching.contexts_of(items), strict=True):
            try:
                starts.append(_start(item["args"][0]))
            except Exception as exc:  # what the message says is wrong: it would fail every time
                batching.dead_letter(self, item["queue"] or "orchestrator", item, exc)
                continue
            contexts.append(context)
        if starts:
            engine.saga_start_many(starts=starts, contexts=contexts)

else:

    @shared_task(name="orchestration.start_saga", ignore_result=True)
    def start_saga(message: dict) -> None:
        saga_id, definition, context = _start(message)
        engine.saga_start(saga_id=saga_id, definition=definition, context=context)


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
