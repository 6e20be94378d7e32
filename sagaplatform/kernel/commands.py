"""The command/reply contract between the orchestrator and the services.

A command names a saga, a step, an op (`action` or `compensate`), the operation to run and the
attempt number. The service runs it through the barrier and answers with a reply written to its
own outbox in the same transaction, so the effect and the news of it commit together.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

from django.db import transaction

from sagaplatform.observability import hooks as observability

from . import attempts, barrier, faults, outbox
from .errors import TransientError
from .models import FaultRule

logger = logging.getLogger(__name__)

ORCHESTRATOR_QUEUE = "orchestrator"
REPLY_TASK = "orchestration.handle_reply"

SUCCEEDED = "succeeded"
BUSINESS_FAILURE = "business_failure"
TRANSIENT_ERROR = "transient_error"

ACTION = "action"
COMPENSATE = "compensate"
CONFIRM = "confirm"


@dataclass(frozen=True)
class Command:
    saga_id: uuid.UUID
    step: str
    op: str
    operation: str
    attempt: int
    payload: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_message(cls, message: dict[str, Any]) -> Command:
        return cls(
            saga_id=uuid.UUID(str(message["saga_id"])),
            step=message["step"],
            op=message["op"],
            operation=message["operation"],
            attempt=int(message["attempt"]),
            payload=message.get("payload") or {},
        )

    def to_message(self) -> dict[str, Any]:
        return {**asdict(self), "saga_id": str(self.saga_id)}


Operation = Callable[..., dict[str, Any] | None]
_OPERATIONS: dict[tuple[str, str], Operation] = {}
_OUTSIDE: dict[tuple[str, str], Callable[..., None]] = {}


def operation(
    service: str, name: str, *, outside: Callable[..., None] | None = None
) -> Callable[[Operation], Operation]:
    """Register `fn(*, command) -> dict[str, Any] | None` as the service operation `name`.

    `outside(*, command)`, if given, makes the operation's calls outside the platform (a card
    gateway) before the operation's transaction and with none open, so no lock waits on the other
    side's answer. It records its intent and its outcome in transactions of its own (see
    `barrier.begin`); `fn` then reads the recorded outcome."""

    def register(fn: Operation) -> Operation:
        key = (service, name)
        if key in _OPERATIONS and _OPERATIONS[key] is not fn:
            raise RuntimeError(f"operation {service}.{name} registered twice")
        _OPERATIONS[key] = fn
        if outside is not None:
            _OUTSIDE[key] = outside
        return fn

    return register


def get_operation(service: str, name: str) -> Operation:
    return _OPERATIONS[(service, name)]


def registered_operations(service: str) -> list[str]:
    return sorted(name for (svc, name) in _OPERATIONS if svc == service)


def call_outside(*, service: str, command: Command) -> None:
    """Run the operation's outside call, if it has one (see `operation`)."""
    hook = _OUTSIDE.get((service, command.operation))
    if hook is not None:
        hook(command=command)


def _reply(command: Command, outcome: dict[str, Any]) -> dict[str, Any]:
    return {
        "saga_id": str(command.saga_id),
        "step": command.step,
        "op": command.op,
        "attempt": command.attempt,
        **outcome,
    }


def execute(*, service: str, message: dict[str, Any]) -> dict[str, Any]:
    """Run one command on `service`'s database and queue the reply. Returns the outcome."""
    command = Command.from_message(message)
    # The reply is published (or applied here: `outbox.inline_after`) once the attempt is done.
    with outbox.inline_after(), observability.step_attempt(service, command) as attempt:
        outcome = _execute(service, command)
        attempt.done(outcome)
    if (service, command.operation) in _OPERATIONS:
        faults.crash_if(FaultRule.CrashPoint.AFTER_REPLY, service, command.operation)
    return outcome


def _execute(service: str, command: Command) -> dict[str, Any]:
    # The step's lease runs from here, not from when the command was sent: the sweeper reads
    # this mark before it counts a lease as expired (a command still queued is not late).
    mark = attempts.key(command.saga_id, command.step, command.op, command.attempt)
    attempts.mark_started(mark)
    fn = _OPERATIONS.get((service, command.operation))
    if fn is None:
        outcome = {
            "status": BUSINESS_FAILURE,
            "error": {"code": "unknown_operation", "message": f"{service} has no operation {command.operation!r}"},
        }
        with transaction.atomic(using=service):
            outbox.enqueue(
                using=service, task=REPLY_TASK, queue=ORCHESTRATOR_QUEUE, payload=_reply(command, outcome), inline=True
            )
        attempts.mark_answered(mark)
        return outcome
    try:
        faults.before(service, command.operation, command.attempt)
        call_outside(service=service, command=command)
        with transaction.atomic(using=service):
            faults.arm_after_commit(service, command.operation)
            outcome = barrier.call(using=service, command=command, fn=fn)
            outbox.enqueue(
                using=service, task=REPLY_TASK, queue=ORCHESTRATOR_QUEUE, payload=_reply(command, outcome), inline=True
            )
            faults.crash_if(FaultRule.CrashPoint.BEFORE_COMMIT, service, command.operation)
    except Exception as exc:  # unknown errors count as transient, bounded by the step's policy
        error = (
            exc.as_dict()
            if isinstance(exc, TransientError)
            else {
                "code": "unexpected_error",
                "message": f"{type(exc).__name__}: {exc}",
            }
        )
        logger.warning(
            "%s.%s failed transiently: %s",
            service,
            command.operation,
            error["message"],
            extra={"saga_id": str(command.saga_id), "step": command.step, "attempt": command.attempt},
        )
        outcome = {"status": TRANSIENT_ERROR, "error": error}
        with transaction.atomic(using=service):
            outbox.enqueue(
                using=service, task=REPLY_TASK, queue=ORCHESTRATOR_QUEUE, payload=_reply(command, outcome), inline=True
            )
    attempts.mark_answered(mark)  # the reply is committed: a late lease now waits for it
    return outcome


def run(*, service: str, message: dict[str, Any]) -> dict[str, Any]:
    """Run a command's operation directly (tests, tools), through the barrier, without a reply."""
    command = Command.from_message(message)
    call_outside(service=service, command=command)
    with transaction.atomic(using=service):
        return barrier.call(using=service, command=command, fn=_OPERATIONS[(service, command.operation)])
