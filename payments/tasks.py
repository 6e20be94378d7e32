import logging
import uuid

from celery import shared_task

from sagaplatform.kernel import choreography, commands

logger = logging.getLogger(__name__)


@shared_task(name="payments.execute", ignore_result=True)
def execute(message: dict) -> None:
    commands.execute(service="payments", message=message)


@shared_task(name="payments.react", ignore_result=True)
def react(message: dict) -> None:
    _call_outside(message)
    choreography.react(service="payments", message=message)


def _call_outside(message: dict) -> None:
    """A reaction's gateway call, before the reaction's transaction (as `commands.execute` does for
    a command). If it fails, the reaction's operation finds the charge still pending and fails
    transiently, and the reaction retries on its own backoff."""
    try:
        rule = next(r for r in choreography.reactions() if r.service == "payments" and r.key == message.get("reaction"))
        command = commands.Command(
            saga_id=uuid.UUID(str(message["saga_id"])),
            step=rule.step,
            op=rule.op,
            operation=rule.operation,
            attempt=int(message.get("attempt", 1)),
            payload={**(message.get("context") or {}), "failure": message.get("failure")},
        )
        commands.call_outside(service="payments", command=command)
    except Exception as exc:  # the reaction itself reports the failure and retries
        logger.warning("payments reaction %s: gateway call failed: %s", message.get("reaction"), exc)
