"""Choreography: services react to each other's events, with no coordinator.

Each service declares its *reactions* (in its own `choreography.py`): on event E, run one of its
operations for a step, then publish event S on success or F on failure. Publishing an event is
writing one outbox row per subscriber (point-to-point queues emulate pub/sub), plus one for the
passive tracker, in the same local transaction as the effect; the outbox delivers them after
commit. Every reaction runs through the barrier, so a redelivered event is a replay, a
compensation that overtakes its action is a null compensation, and the overtaken action is refused
(and publishes nothing: the chain stops there).

Circuit breakers (`breakers.py`): each reaction's outcome counts for its service's breaker
(transient errors as failures; successes and business failures as answers). While the breaker of
its service, or of what its operation calls (`Reaction.breakers`: the payment gateway's), refuses
calls, a reaction waits instead of running (`defer`): the same event comes back to it after
`breakers.resume_delay` (the breaker's open period plus a jitter), its attempt not consumed, and
the tracker hears of the wait (the step's timeline shows `step_deferred`). A transient failure
while a breaker refuses calls is not counted against the reaction's attempts either.

Retries live with the service that failed: a transient error re-sends the event to the same
reaction after a backoff (a delayed outbox row); past its attempts, the reaction undoes its own
step (a no-op if nothing committed) and publishes its failure event, which makes the earlier
services compensate.
"""

from __future__ import annotations

import json
import logging
import random
import uuid
from collections.abc import Callable, Collection
from dataclasses import dataclass
from typing import Any

from django.conf import settings
from django.db import transaction

from sagaplatform.observability import hooks as observability

from . import barrier, breakers, events, faults, outbox
from .commands import (
    ACTION,
    BUSINESS_FAILURE,
    COMPENSATE,
    SUCCEEDED,
    TRANSIENT_ERROR,
    Command,
    get_operation,
)
from .errors import TransientError
from .models import Barrier

logger = logging.getLogger(__name__)

TRACK_TASK = "orchestration.track_event"
TRACK_QUEUE = "orchestrator"


@dataclass(frozen=True)
class Reaction:
    service: str
    on: tuple[str, ...]  # the events it subscribes to
    step: str  # the step it performs (the names of the orchestrated saga, for the tracker)
    op: str  # ACTION, or COMPENSATE for an undo
    operation: str  # the service operation it runs
    emits: str | None  # published on success
    emits_on_failure: str | None = None  # published on a business failure, or when it gives up
    max_attempts: int = 5
    # Seconds, or the name of a setting: how long after the event the reaction starts.
    start_after: float | str = 0.0
    # The context keys its operation receives (as a step's `inputs`); `failure` always comes too.
    inputs: tuple[str, ...] = ("order_id",)
    # The event schema versions it can run on (`events.SCHEMA`): a reaction that starts
    # reading a new field accepts only the schema that carries it.
    accepts: tuple[int, ...] = (events.SCHEMA,)
    # The circuit breakers of what its operation calls, besides its service's own: while one of
    # them refuses calls, the reaction waits (`defer`). Its caller asks that breaker itself
    # (the payments service asks the gateway's before calling it).
    breakers: tuple[str, ...] = ()

    @property
    def key(self) -> str:
        return f"{self.step}:{self.op}"

    def start_delay(self) -> float:
        return float(getattr(settings, self.start_after)) if isinstance(self.start_after, str) else self.start_after

    def backoff(self, failed_attempt: int) -> float:
        return random.uniform(0, min(30.0, 0.5 * 2 ** (failed_attempt - 1)))


_REACTIONS: list[Reaction] = []


def reaction(**fields: Any) -> Reaction:
    declared = Reaction(**fields)
    for name in (*declared.on, declared.emits, declared.emits_on_failure):
        if name:
            events.get(name)  # every event name is declared once, in events.py
    if any(r.service == declared.service and r.key == declared.key for r in _REACTIONS):
        raise RuntimeError(f"reaction {declared.service}:{declared.key} declared twice")
    _REACTIONS.append(declared)
    return declared


def reactions() -> list[Reaction]:
    return list(_REACTIONS)


def subscribers(event: str) -> list[Reaction]:
    return [r for r in _REACTIONS if event in r.on]


def relayed(rule: Reaction) -> frozenset[str]:
    """The context keys a subscriber's copy of an event carries: the declared `inputs` of every
    reaction. A service passes the context on (there is no coordinator to hold it), and the
    tracker rebuilds an earlier step's trigger from whatever context reached it, even when it
    first hears of a saga at its end; so every event carries what any step of the flow needs,
    and what names the saga's definition (`NAMING`: the tracker creates the saga from whichever
    event it hears of first, a service's note that it waits for a circuit breaker included),
    and nothing else. Each operation still receives only its own `inputs` (`payload_for`)."""
    del rule  # the same keys for every subscriber: see above
    return frozenset((*NAMING, *(key for reaction in _REACTIONS for key in reaction.inputs)))


# The context keys that name a saga's definition (`orchestration.definitions.for_context`).
NAMING = ("definition", "mode")


def _only(context: dict[str, Any], keys: Collection[str]) -> dict[str, Any]:
    return {k: v for k, v in context.items() if k in keys}


def subscriber_copy(message: dict[str, Any], rule: Reaction) -> dict[str, Any]:
    """The event as one subscriber receives it: addressed to its reaction, with only the context
    keys some reaction declares (`relayed`). Whoever sends an event to a reaction
    builds the message with this (`publish`, and the tracker's nudges)."""
    return {**message, "context": _only(message.get("context") or {}, relayed(rule)), "reaction": rule.key}


def payload_for(rule: Reaction, message: dict[str, Any]) -> dict[str, Any]:
    """What the reaction's operation receives: its declared `inputs` and the failure, if any."""
    return {**_only(message.get("context") or {}, rule.inputs), "failure": message.get("failure")}


def _find(service: str, key: str) -> Reaction:
    return next(r for r in _REACTIONS if r.service == service and r.key == key)


def event_message(
    *,
    event: str,
    saga_id: uuid.UUID | str,
    context: dict[str, Any],
    failure: dict[str, Any] | None = None,
    emitter: dict[str, Any] | None = None,
) -> dict[str, Any]:
    events.get(event)  # refuse a name no one declared (a typo would reach no subscriber)
    return _envelope(event=event, saga_id=saga_id, context=context, failure=failure, emitter=emitter)


def _envelope(
    *,
    event: str,
    saga_id: uuid.UUID | str,
    context: dict[str, Any],
    failure: dict[str, Any] | None,
    emitter: dict[str, Any] | None,
) -> dict[str, Any]:
    return {
        "event": event,
        "schema": events.SCHEMA,
        "event_id": str(uuid.uuid4()),
        "saga_id": str(saga_id),
        "context": context,
        "failure": failure,
        "emitter": emitter,
    }


def _malformed(message: object, required: tuple[str, ...]) -> str | None:
    if not isinstance(message, dict):
        return f"an event message must be an object, got {type(message).__name__}"
    missing = [k for k in required if k not in message]
    if missing:
        return f"event message without {', '.join(missing)}"
    if not isinstance(message["context"], dict):
        return "the event's context is not an object"
    try:
        uuid.UUID(str(message["saga_id"]))
    except ValueError:
        return f"saga_id {str(message['saga_id'])[:64]!r} is not a UUID"
    if "schema" not in message:
        return f"unversioned event {str(message['event'])[:64]!r} (no schema)"
    return None


def unrunnable(*, service: str, message: Any) -> tuple[str, str] | None:
    """Why `service` cannot run this event message: (dead-letter reason, what is wrong), or None.
    A malformed or unversioned message, a reaction the service no longer has, or a schema
    version the reaction does not accept."""
    problem = _malformed(message, ("event", "saga_id", "context", "reaction"))
    if problem:
        return "malformed", problem
    rule = next((r for r in _REACTIONS if r.service == service and r.key == message["reaction"]), None)
    if rule is None:
        return "failed", f"{service} has no reaction {message['reaction']!r} (to {message['event']!r})"
    if message["schema"] not in rule.accepts:
        return "failed", (
            f"no live reaction accepts {message['event']!r} schema {message['schema']!r}: "
            f"{service}:{rule.key} accepts {list(rule.accepts)}"
        )
    return None


# The event schema versions the tracker records.
TRACKED_SCHEMAS = (events.SCHEMA,)


def tracker_problem(message: Any) -> tuple[str, str] | None:
    """Why the tracker cannot record this event message (as `unrunnable`), or None."""
    problem = _malformed(message, ("event", "saga_id", "context"))
    if problem:
        return "malformed", problem
    if message["schema"] not in TRACKED_SCHEMAS:
        return "failed", f"the tracker does not know {message['event']!r} schema {message['schema']!r}"
    return None


def park(*, queue: str, task: str, message: Any, problem: tuple[str, str]) -> None:
    """Park an event message as a dead letter in the database of `queue` (the orchestrator
    raises an alert for each), instead of failing on it or dropping it."""
    from . import deadletters

    reason, error = problem
    deadletters.record(
        queue=queue,
        reason=reason,
        raw=json.dumps(message, default=str),
        task=task,
        message_id=str(message.get("event_id", "")) if isinstance(message, dict) else "",
        error=error,
        in_task=True,
    )


def park_unrunnable(*, service: str, message: Any) -> bool:
    """Park an event `service` cannot run (`unrunnable`). True if parked."""
    problem = unrunnable(service=service, message=message)
    if problem is None:
        return False
    park(queue=service, task=f"{service}.react", message=message, problem=problem)
    return True


def publish(*, using: str, message: dict[str, Any]) -> list[Any]:
    """Fan an event out to its subscribers and the tracker, in the caller's transaction.
    Returns the outbox rows written, subscribers first. Each subscriber's copy carries only the
    context keys some reaction declares (`relayed`); the tracker's, the whole
    context it was given (it keeps the saga's context, to rebuild an event it must nudge)."""
    written = []
    for subscriber in subscribers(message["event"]):
        written.append(
            outbox.enqueue(
                using=using,
                task=f"{subscriber.service}.react",
                queue=subscriber.service,
                payload={**subscriber_copy(message, subscriber), "attempt": 1},
                delay=subscriber.start_delay(),
            )
        )
    # The tracker's copy is applied by this worker itself when it consumes the tracker's queue.
    written.append(outbox.enqueue(using=using, task=TRACK_TASK, queue=TRACK_QUEUE, payload=message, inline=True))
    return written


def counted_attempt(message: dict[str, Any]) -> int:
    """The attempts of a reaction that count against its `max_attempts`: those that failed while
    a circuit breaker refused calls (`deferrals`) do not."""
    return int(message.get("attempt", 1)) - int(message.get("deferrals", 0))


def _refused(service: str, rule: Reaction) -> tuple[str, breakers.Verdict] | None:
    """The breaker that refuses this reaction's calls now, and its verdict; None if none does.
    The others' (`rule.breakers`) are only looked at, first: their own callers ask them. The
    service's is asked as a call would be: a half-open one reserves a probe for this reaction,
    whose outcome is then recorded."""
    for name in rule.breakers:
        verdict = breakers.peek(name)
        if not verdict.admitted:
            return name, verdict
    verdict = breakers.admit(service)
    return None if verdict.admitted else (service, verdict)


def defer(*, service: str, message: dict[str, Any]) -> bool:
    """Wait instead of running a reaction while a breaker it needs refuses calls: the same event,
    the same attempt, comes back after `breakers.resume_delay`, and the tracker records the
    wait. True if it waits. (A message `unrunnable` says the service cannot run is not asked.)"""
    if not breakers.enabled() or unrunnable(service=service, message=message):
        return False
    rule = _find(service, message["reaction"])
    refused = _refused(service, rule)
    if refused is None:
        return False
    _wait(service, rule, message, refused, again=message, attempt=int(message.get("attempt", 1)) - 1)
    return True


def _wait(
    service: str,
    rule: Reaction,
    message: dict[str, Any],
    refused: tuple[str, breakers.Verdict],
    *,
    again: dict[str, Any],
    attempt: int,
    not_counted: bool = False,
) -> None:
    """Send `again` to this reaction once the refusing breaker may admit it (with the jitter),
    and tell the tracker: in the caller's transaction, or one of its own."""
    name, verdict = refused
    delay = breakers.resume_delay(verdict)
    logger.info("%s reaction %s waits %.1f s for the %s circuit breaker", service, rule.key, delay, name)
    emitter = {
        "service": service,
        "step": rule.step,
        "op": rule.op,
        "status": "deferred",
        "event": message["event"],
        "breaker": name,
        "state": verdict.state,
        "resume_in": round(delay, 3),
        "attempt": attempt,
    }
    if not_counted:
        emitter["not_counted"] = True
    with transaction.atomic(using=service):
        outbox.enqueue(using=service, task=f"{service}.react", queue=service, payload=again, delay=delay)
        _track(service, message, emitter=emitter)


def react(*, service: str, message: dict[str, Any], admitted: bool = False) -> dict[str, Any]:
    """Run one reaction to one event (a service's `react` task calls this). An event it cannot
    run is parked (`park_unrunnable`). While a breaker it needs refuses calls it waits instead
    (`defer`; `admitted`: the caller already asked)."""
    if park_unrunnable(service=service, message=message):
        return {"status": "parked"}
    if not admitted and defer(service=service, message=message):
        return {"status": "deferred"}
    rule = _find(service, message["reaction"])
    attempt = int(message.get("attempt", 1))
    command = Command(
        saga_id=uuid.UUID(message["saga_id"]),
        step=rule.step,
        op=rule.op,
        operation=rule.operation,
        attempt=attempt,
        payload=payload_for(rule, message),
    )
    with outbox.inline_after(), observability.step_attempt(service, command, reaction=rule.key) as step_attempt:
        outcome = _react(service, rule, message, command, attempt)
        step_attempt.done(outcome)
    return outcome


def _react(service: str, rule: Reaction, message: dict[str, Any], command: Command, attempt: int) -> dict[str, Any]:
    try:
        faults.before(service, rule.operation, attempt)
        with transaction.atomic(using=service):
            outcome = barrier.call(using=service, command=command, fn=get_operation(service, rule.operation))
            _announce(service, rule, message, outcome, command)
        breakers.record(service, outcome.get("status") != TRANSIENT_ERROR)  # a business failure is an answer
        return outcome
    except Exception as exc:  # transient, like every unknown error
        error = exc.as_dict() if isinstance(exc, TransientError) else {"code": "unexpected_error", "message": str(exc)}
        logger.warning("%s reaction %s failed (attempt %d): %s", service, rule.key, attempt, error["message"])
        breakers.record(service, False)
        held = _held(rule)
        if held is not None:
            # A breaker refuses calls now: this failure does not count, and the next attempt
            # waits for the breaker.
            again = {**message, "attempt": attempt + 1, "deferrals": int(message.get("deferrals", 0)) + 1}
            _wait(service, rule, message, held, again=again, attempt=attempt, not_counted=True)
            return {"status": "transient_error", "error": error, "deferred": True}
        with transaction.atomic(using=service):
            if counted_attempt(message) < rule.max_attempts:
                outbox.enqueue(
                    using=service,
                    task=f"{service}.react",
                    queue=service,
                    payload={**message, "attempt": attempt + 1},
                    delay=rule.backoff(attempt),
                )
            else:
                _give_up(service, rule, message, command, error)
        return {"status": "transient_error", "error": error}


def held(rule: Reaction) -> bool:
    """Would a transient failure of `rule` now be held (not counted), a breaker refusing calls?"""
    return _held(rule) is not None


def _held(rule: Reaction) -> tuple[str, breakers.Verdict] | None:
    """After a transient failure: the breaker that refuses calls now, if any (looked at only:
    the retry asks again when it comes)."""
    for name in (*rule.breakers, rule.service):
        verdict = breakers.peek(name)
        if not verdict.admitted:
            return name, verdict
    return None


def _announce(service: str, rule: Reaction, message: dict[str, Any], outcome: dict[str, Any], command: Command) -> None:
    emitter = {
        "service": service,
        "step": rule.step,
        "op": rule.op,
        "status": outcome["status"],
        "event": message["event"],
    }
    emitter["null_compensation"] = outcome.get("barrier") == "null_compensation"
    if outcome.get("replayed") and message.get("nudge") and _republish_give_up(service, rule, message, command):
        return
    if (outcome.get("error") or {}).get("code") == barrier.REFUSED_AFTER_COMPENSATION_CODE:
        # Overtaken by its compensation: it did nothing, and nothing follows from it.
        _track(service, message, emitter={**emitter, "status": "refused"})
        return
    if outcome.get("replayed") and not message.get("nudge"):
        # A redelivered event: what this reaction published the first time committed with its
        # effect, and the outbox delivers it. (A nudge from the tracker, which suspects the
        # event was lost after it was published, publishes it again.)
        return
    failure = message.get("failure")
    if outcome["status"] == SUCCEEDED:
        event = rule.emits
    else:
        event = rule.emits_on_failure
        failure = {**(outcome.get("error") or {}), "step": rule.step}
        emitter["definitive"] = outcome["status"] == BUSINESS_FAILURE
    if event:
        publish(
            using=service,
            message=event_message(
                event=event, saga_id=message["saga_id"], context=message["context"], failure=failure, emitter=emitter
            ),
        )
    else:
        _track(service, message, emitter=emitter)


def _give_up(service: str, rule: Reaction, message: dict[str, Any], command: Command, error: dict[str, Any]) -> None:
    """Out of attempts. The last one may have committed after all: undo this step too (the
    barrier makes that a no-op if it never ran, and refuses it should it run later).

    Unless another delivery of the event ran the reaction to its end (the tracker's nudge starts
    a second run beside a chain of retries): its outcome and its event committed together, the
    next services act on it, and this give-up changes nothing (`barrier.call(unless_answered)`,
    `barrier.answered`)."""
    undo = _undo_of(service, rule)
    if undo is None and barrier.answered(using=service, saga_id=command.saga_id, step=rule.step, op=rule.op):
        # Nothing to undo, and no failure to tell: the tracker heard the reaction's own answer.
        logger.info("%s reaction %s gave up, but another delivery had answered it", service, rule.key)
        return
    undone: str | None = None
    failure = {
        "code": "retries_exhausted",
        "message": f"{rule.step} failed after {command.attempt} attempt(s): {error['message']}",
        "step": rule.step,
    }
    if undo is not None:
        settle = _SETTLERS.get((service, rule.operation))
        if settle is not None:
            # The action may have taken effect outside (a gateway) with its outcome never
            # stored: the undo undoes what it finds, and the action's row says what that was.
            settle(saga_id=command.saga_id, step=rule.step)
        undo_command = Command(
            saga_id=command.saga_id,
            step=rule.step,
            op=COMPENSATE,
            operation=undo.operation,
            attempt=1,
            payload=command.payload,
        )
        result = barrier.call(
            using=service, command=undo_command, fn=get_operation(service, undo.operation), unless_answered=True
        )
        if result is barrier.ACTION_ANSWERED:
            logger.info("%s reaction %s gave up, but another delivery had answered it", service, rule.key)
            return
        if result.get("barrier") == "null_compensation":
            undone = "null_compensation"  # it never ran, and never will
        else:
            if settle is not None:
                # A run in flight when the settle above looked (its gateway call unanswered) may
                # have recorded its charge since, which the undo then refunded: that is the
                # action's outcome now, stored so that the run, once it gets to its transaction,
                # replays it instead of announcing a success.
                settle(saga_id=command.saga_id, step=rule.step)
            undone = "compensated" if result["status"] == SUCCEEDED else "refused"
        # From now on the action only replays (refused, or its undone success): remember the
        # give-up with the undo, so that a re-request publishes this failure again, not that.
        gave_up = {"failure": failure, "undone": undone, "error": error}
        Barrier.objects.using(service).filter(saga_id=command.saga_id, step=rule.step, op=COMPENSATE).update(
            outcome={**{k: v for k, v in result.items() if k != "replayed"}, "gave_up": gave_up}
        )
    _publish_give_up(service, rule, message, failure=failure, undone=undone, error=error)


# (service, action operation) -> settle(*, saga_id, step): stores the outcome of an action that
# took effect outside the platform but never stored it, before a reaction that gives up undoes it.
_SETTLERS: dict[tuple[str, str], Callable[..., None]] = {}


def settles(service: str, operation: str) -> Callable[[Callable[..., None]], Callable[..., None]]:
    """Register `fn(*, saga_id, step)` to settle `service`'s `operation` before a give-up's undo:
    in the give-up's transaction, it stores the action's outcome in its barrier row if the action
    took effect (so its undo is a compensation of a recorded action), or its failure if it did
    not (so the undo is a null compensation)."""

    def register(fn: Callable[..., None]) -> Callable[..., None]:
        _SETTLERS[(service, operation)] = fn
        return fn

    return register


def _undo_of(service: str, rule: Reaction) -> Reaction | None:
    if rule.op != ACTION:
        return None
    return next((r for r in _REACTIONS if r.service == service and r.step == rule.step and r.op == COMPENSATE), None)


def _republish_give_up(service: str, rule: Reaction, message: dict[str, Any], command: Command) -> bool:
    """A re-requested action that had given up: publish its failure again (it may have been lost
    after it was published), as a re-requested success publishes its success again."""
    if _undo_of(service, rule) is None:
        return False
    stored = (
        Barrier.objects.using(service)
        .filter(saga_id=command.saga_id, step=rule.step, op=COMPENSATE)
        .values_list("outcome", flat=True)
        .first()
    )
    gave_up = (stored or {}).get("gave_up")
    if not gave_up:
        return False
    _publish_give_up(
        service, rule, message, failure=gave_up["failure"], undone=gave_up["undone"], error=gave_up["error"]
    )
    return True


def _publish_give_up(
    service: str,
    rule: Reaction,
    message: dict[str, Any],
    *,
    failure: dict[str, Any],
    undone: str | None,
    error: dict[str, Any],
) -> None:
    emitter = {"service": service, "step": rule.step, "op": rule.op, "status": "gave_up", "event": message["event"]}
    emitter["undone"] = undone
    if rule.emits_on_failure:
        publish(
            using=service,
            message=event_message(
                event=rule.emits_on_failure,
                saga_id=message["saga_id"],
                context=message["context"],
                failure=failure,
                emitter=emitter,
            ),
        )
    else:
        _track(service, message, emitter={**emitter, "error": error})


def _track(service: str, message: dict[str, Any], *, emitter: dict[str, Any]) -> None:
    """Tell the tracker what happened when no event carries the news (a note for the tracker
    alone, `<step>.<status>`, not an event of the flow: no service subscribes to it)."""
    outbox.enqueue(
        using=service,
        task=TRACK_TASK,
        queue=TRACK_QUEUE,
        payload=_envelope(
            event=f"{emitter['step']}.{emitter['status']}",
            saga_id=message["saga_id"],
            context=message["context"],
            failure=message.get("failure"),
            emitter=emitter,
        ),
    )
