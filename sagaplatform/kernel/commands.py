"""The command/reply contract between the orchestrator and the services.

A command names a saga, a step, an op (`action` or `compensate`), the operation to run and the
attempt number. The service runs it through the barrier and answers with a reply written to its
own outbox in the same transaction, so the effect and the news of it commit together.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

from django.db import connections, transaction

from sagaplatform.observability import hooks as observability
from sagaplatform.observability import tracing

from . import attempts, barrier, faults, outbox
from .errors import BusinessError, TransientError
from .models import FaultRule, OutboxMessage

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
_READY: dict[tuple[str, str], Callable[..., bool]] = {}


def operation(
    service: str,
    name: str,
    *,
    outside: Callable[..., None] | None = None,
    ready: Callable[..., bool] | None = None,
) -> Callable[[Operation], Operation]:
    """Register `fn(*, command) -> dict[str, Any] | None` as the service operation `name`.

    `outside(*, command)`, if given, makes the operation's calls outside the platform (a card
    gateway) before the operation's transaction and with none open, so no lock waits on the other
    side's answer. It records its intent and its outcome in transactions of its own (see
    `barrier.begin`); `fn` then reads the recorded outcome.

    `ready(*, command) -> bool`, if given, says whether what the command needs from another
    message has arrived (a card's registration). A command run where the engine committed it
    (`ready_here`) that is not ready goes through the service's queue instead, behind that
    message."""

    def register(fn: Operation) -> Operation:
        key = (service, name)
        if key in _OPERATIONS and _OPERATIONS[key] is not fn:
            raise RuntimeError(f"operation {service}.{name} registered twice")
        _OPERATIONS[key] = fn
        if outside is not None:
            _OUTSIDE[key] = outside
        if ready is not None:
            _READY[key] = ready
        return fn

    return register


def get_operation(service: str, name: str) -> Operation:
    return _OPERATIONS[(service, name)]


def registered_operations(service: str) -> list[str]:
    return sorted(name for (svc, name) in _OPERATIONS if svc == service)


def ready_here(service: str, command: Command) -> bool:
    """Whether `command` may run now, where the engine committed it: its operation's `ready`
    says so, or it has none. If the check itself fails, the queue takes the command."""
    check = _READY.get((service, command.operation))
    if check is None:
        return True
    try:
        return bool(check(command=command))
    except Exception:
        logger.warning("%s.%s: readiness check failed", service, command.operation, exc_info=True)
        return False


def calls_outside(service: str, operation: str) -> bool:
    """Whether `service`'s `operation` makes a call outside the platform (see `operation`)."""
    return (service, operation) in _OUTSIDE


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


# How long each operation's commands took to run in this process, in ms (service, operation ->
# a moving average): what a drain weighs before it runs a saga's parallel steps one after another
# (`outbox.RUN_MS`). The barrier, the operation, the reply's INSERT and the commit, not what the
# reply sets off.
_RUN_MS: dict[tuple[str, str], float] = {}
_SMOOTHING = 0.2


def _took(service: str, ran: list[Command], started: float) -> None:
    if not ran:
        return
    each = (time.perf_counter() - started) * 1000 / len(ran)
    for command in ran:
        key = (service, command.operation)
        before = _RUN_MS.get(key)
        _RUN_MS[key] = each if before is None else before + _SMOOTHING * (each - before)


def expected_ms(service: str, operation: str) -> float | None:
    """How long a command of `operation` on `service` takes to run here (None: none has yet)."""
    return _RUN_MS.get((service, operation))


def forget_run_times() -> None:
    _RUN_MS.clear()


def execute(*, service: str, message: dict[str, Any]) -> dict[str, Any]:
    """Run one command on `service`'s database and queue the reply. Returns the outcome."""
    command = Command.from_message(message)
    # The reply is published (or applied here: `outbox.inline_after`) once the attempt is done.
    with outbox.inline_after(), observability.step_attempt(service, command) as attempt:
        started = time.perf_counter()
        outcome = _execute(service, command)
        _took(service, [command], started)
        attempt.done(outcome)
    if (service, command.operation) in _OPERATIONS:
        faults.crash_if(FaultRule.CrashPoint.AFTER_REPLY, service, command.operation)
    return outcome


def execute_many(
    *, service: str, commands: list[Command], contexts: list[dict[str, Any] | None] | None = None
) -> list[dict[str, Any]]:
    """Run a batch of commands on `service`'s database in one transaction and queue their
    replies with one INSERT; the replies are then applied where they committed, as one batch
    (`outbox.inline_after`). Returns the outcomes, in order.

    Each command is decided on its own, as `execute` decides it: the barrier, and the operation
    in its savepoint (a business failure rolls back its effects alone). If anything else raises
    (a transient error, a bug), the batch rolls back and each of its commands runs again in a
    transaction of its own, so only that one answers with a transient error. An operation that
    calls outside the platform runs alone (`execute`): no batch waits on the other side's
    answer."""
    contexts = contexts or [None] * len(commands)
    if len(commands) > 1:
        logger.info("%s.execute: %d messages in one batch", service, len(commands))
    alone = [i for i, command in enumerate(commands) if calls_outside(service, command.operation)]
    batch = [i for i in range(len(commands)) if i not in set(alone)]
    outcomes: dict[int, dict[str, Any]] = {}
    marks = [attempts.key(c.saga_id, c.step, c.op, c.attempt) for c in (commands[i] for i in batch)]
    with outbox.inline_after():
        started = time.perf_counter()
        attempts.mark_many_started(marks)
        ready: list[int] = []
        for i in batch:
            command = commands[i]
            try:
                if (service, command.operation) in _OPERATIONS:
                    with tracing.restored(contexts[i]):
                        faults.before(service, command.operation, command.attempt)
            except Exception as exc:  # an injected failure: a transient error, as in `execute`
                outcomes[i] = _transient(service, command, exc, contexts[i])
                continue
            ready.append(i)
        if len(ready) > 1:
            try:
                items = [(i, commands[i], contexts[i]) for i in ready]
                try:
                    outcomes.update(_execute_together(service, items, savepoint=False))
                except BusinessError:  # one of them failed: again, each in a savepoint (see barrier.call)
                    outcomes.update(_execute_together(service, items, savepoint=True))
                ready = []
            except Exception:
                logger.warning(
                    "a batch of %d %s commands failed; running each alone", len(ready), service, exc_info=True
                )
        for i in ready:
            with tracing.restored(contexts[i]), observability.step_attempt(service, commands[i]) as attempt:
                outcomes[i] = _execute_transaction(service, commands[i])
                attempt.done(outcomes[i])
        attempts.mark_many_answered(marks)  # the replies are committed: a late lease now waits for them
        _took(service, [commands[i] for i in batch], started)
    for i in alone:
        with tracing.restored(contexts[i]):
            outcomes[i] = execute(service=service, message=commands[i].to_message())
    for i in batch:
        if (service, commands[i].operation) in _OPERATIONS:
            faults.crash_if(FaultRule.CrashPoint.AFTER_REPLY, service, commands[i].operation)
    return [outcomes[i] for i in range(len(commands))]


def _execute_together(
    service: str, items: list[tuple[int, Command, dict[str, Any] | None]], *, savepoint: bool
) -> dict[int, dict[str, Any]]:
    outcomes: dict[int, dict[str, Any]] = {}
    replies: list[OutboxMessage] = []
    # The actions' barrier rows, inserted together once they all ran (see `barrier.call`'s fast path).
    actions: list[tuple[Command, dict[str, Any]]] = []
    with transaction.atomic(using=service):
        for i, command, context in items:
            with tracing.restored(context), observability.step_attempt(service, command) as attempt:
                fn = _OPERATIONS.get((service, command.operation))
                if fn is None:
                    outcome = _unknown_operation(service, command)
                elif not savepoint and command.op == barrier.ACTION:
                    faults.arm_after_commit(service, command.operation)
                    outcome = barrier.run_first(using=service, command=command, fn=fn)
                    actions.append((command, outcome))
                else:
                    faults.arm_after_commit(service, command.operation)
                    outcome = barrier.call(using=service, command=command, fn=fn, savepoint=savepoint)
                attempt.done(outcome)
                replies.append(
                    outbox.message(task=REPLY_TASK, queue=ORCHESTRATOR_QUEUE, payload=_reply(command, outcome))
                )
            outcomes[i] = outcome
        _write_outcomes(service, actions, replies)
        for _, command, _ in items:
            faults.crash_if(FaultRule.CrashPoint.BEFORE_COMMIT, service, command.operation)
    return outcomes


def _write_outcomes(service: str, actions: list[tuple[Command, dict[str, Any]]], replies: list[OutboxMessage]) -> None:
    """The barrier rows of the actions run first (`barrier.run_first`) and the replies: on
    PostgreSQL in one statement (two data-modifying parts), elsewhere in two. A barrier row
    already there rolls everything back (`barrier.Decided`)."""
    if actions and connections[service].vendor == "postgresql":
        inserted = outbox.enqueue_along(
            using=service, messages=replies, along=barrier.outcomes_insert(using=service, done=actions), inline=True
        )
        barrier.check_inserted(actions, inserted)
        return
    barrier.insert_outcomes(using=service, done=actions)
    outbox.enqueue_many(using=service, messages=replies, inline=True)


def _unknown_operation(service: str, command: Command) -> dict[str, Any]:
    return {
        "status": BUSINESS_FAILURE,
        "error": {"code": "unknown_operation", "message": f"{service} has no operation {command.operation!r}"},
    }


def _transient(service: str, command: Command, exc: Exception, context: dict[str, Any] | None) -> dict[str, Any]:
    """Answer `command` with a transient error (`exc`), in a transaction of its own."""
    outcome = {"status": TRANSIENT_ERROR, "error": _error_of(service, command, exc)}
    with tracing.restored(context), transaction.atomic(using=service):
        outbox.enqueue(
            using=service, task=REPLY_TASK, queue=ORCHESTRATOR_QUEUE, payload=_reply(command, outcome), inline=True
        )
    return outcome


def _error_of(service: str, command: Command, exc: Exception) -> dict[str, Any]:
    error: dict[str, Any] = (
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
    return error


def _execute(service: str, command: Command) -> dict[str, Any]:
    # The step's lease runs from here, not from when the command was sent: the sweeper reads
    # this mark before it counts a lease as expired (a command still queued is not late).
    mark = attempts.key(command.saga_id, command.step, command.op, command.attempt)
    attempts.mark_started(mark)
    try:
        if (service, command.operation) in _OPERATIONS:
            faults.before(service, command.operation, command.attempt)
            call_outside(service=service, command=command)
    except Exception as exc:  # unknown errors count as transient, bounded by the step's policy
        outcome = _transient(service, command, exc, None)
    else:
        outcome = _execute_transaction(service, command)
    attempts.mark_answered(mark)  # the reply is committed: a late lease now waits for it
    return outcome


def _execute_transaction(service: str, command: Command, *, savepoint: bool = False) -> dict[str, Any]:
    """The command's transaction: the barrier and the operation, and the reply; on any error,
    a transient error's reply in a transaction of its own. The operation runs with no savepoint
    first; a business failure rolls the transaction back and it runs again with one, which
    stores the failure (`barrier.call`)."""
    fn = _OPERATIONS.get((service, command.operation))
    try:
        with transaction.atomic(using=service):
            begun = calls_outside(service, command.operation)  # its intent's row is there
            actions: list[tuple[Command, dict[str, Any]]] = []
            if fn is None:
                outcome = _unknown_operation(service, command)
            elif not savepoint and not begun and command.op == barrier.ACTION:
                # The fast path, its row written with the reply (`_write_outcomes`).
                faults.arm_after_commit(service, command.operation)
                outcome = barrier.run_first(using=service, command=command, fn=fn)
                actions.append((command, outcome))
            else:
                faults.arm_after_commit(service, command.operation)
                outcome = barrier.call(using=service, command=command, fn=fn, savepoint=savepoint, begun=begun)
            reply = outbox.message(task=REPLY_TASK, queue=ORCHESTRATOR_QUEUE, payload=_reply(command, outcome))
            _write_outcomes(service, actions, [reply])
            if fn is not None:
                faults.crash_if(FaultRule.CrashPoint.BEFORE_COMMIT, service, command.operation)
    except BusinessError as exc:
        if not savepoint:
            return _execute_transaction(service, command, savepoint=True)
        outcome = _transient(service, command, exc, None)  # not the barrier's: as any other error
    except Exception as exc:  # unknown errors count as transient, bounded by the step's policy
        outcome = _transient(service, command, exc, None)
    return outcome


def run(*, service: str, message: dict[str, Any]) -> dict[str, Any]:
    """Run a command's operation directly (tests, tools), through the barrier, without a reply."""
    command = Command.from_message(message)
    call_outside(service=service, command=command)
    with transaction.atomic(using=service):
        return barrier.call(using=service, command=command, fn=_OPERATIONS[(service, command.operation)])
