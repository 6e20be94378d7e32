import logging
import uuid

from celery import shared_task

from sagaplatform.kernel import batching, choreography, commands, faults

from . import services

logger = logging.getLogger(__name__)


execute = batching.command_task("payments")


@shared_task(name="payments.react", ignore_result=True)
def react(message: dict) -> None:
    if choreography.park_unrunnable(service="payments", message=message):
        return  # no gateway call for an event no reaction accepts
    if choreography.defer(service="payments", message=message):
        return  # a circuit breaker (payments', or the gateway's) refuses calls: it waits, no call
    _call_outside(message)
    choreography.react(service="payments", message=message, admitted=True)


def _call_outside(message: dict) -> None:
    """A reaction's gateway call, before the reaction's transaction (as `commands.execute` does for
    a command). If it fails, the reaction's operation finds the charge still pending and fails
    transiently, and the reaction retries on its own backoff."""
    rule, attempt = None, int(message.get("attempt", 1))
    try:
        rule = next(r for r in choreography.reactions() if r.service == "payments" and r.key == message.get("reaction"))
        if faults.fails_first("payments", rule.operation, attempt):
            return  # the reaction's own fault hook fails this attempt: no call for it
        command = commands.Command(
            saga_id=uuid.UUID(str(message["saga_id"])),
            step=rule.step,
            op=rule.op,
            operation=rule.operation,
            attempt=attempt,
            payload=choreography.payload_for(rule, message),
        )
        commands.call_outside(service="payments", command=command)
    except Exception as exc:  # the reaction itself reports the failure and retries
        logger.warning("payments reaction %s: gateway call failed: %s", message.get("reaction"), exc)
        last = rule is not None and choreography.counted_attempt(message) >= rule.max_attempts
        if rule is not None and rule.op == commands.ACTION and last and not choreography.held(rule):
            # The last attempt: give the charge up while nothing can have been taken, so the
            # reaction fails for good (`charge_cancelled`) instead of giving up on a charge
            # still pending, whose undo would have to wait on the gateway. (Not while a breaker
            # refuses calls: then this failure does not count, and the reaction tries again.)
            services.charge_abandon(saga_id=uuid.UUID(str(message["saga_id"])))


@shared_task(name=services.REFUND_AT_GATEWAY_TASK, ignore_result=True)
def refund_at_gateway(message: dict) -> None:
    """The gateway refund of a charge already refunded in the ledger (see `charge_refund`)."""
    services.charge_refund_at_gateway(saga_id=uuid.UUID(str(message["saga_id"])))


@shared_task(name="payments.register_payment_method", ignore_result=True)
def register_payment_method(message: dict) -> None:
    """The orders service's registration of a card: `{"reference", "order_id", "sealed_token"}`."""
    services.payment_method_register(
        reference=message["reference"], sealed_token=message["sealed_token"], order_id=message.get("order_id")
    )
