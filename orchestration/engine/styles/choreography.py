"""Choreography: the passive tracker of choreographed sagas.

In a choreography no one is in charge: each service reacts to events and publishes its own.
Every published event also reaches the tracker, which rebuilds the same Saga, SagaStep and
SagaEvent rows a coordinated saga has (for any choreographed definition: the one the event's
context names), so the API, the admin and the dashboard show both alike. It decides nothing
about the business flow; it only:

* records what happened (events can arrive in any order: each observation moves a step along
  its state machine as far as it needs to go);
* watches for an expected event that does not come: each started step gets a lease, and when it
  expires the tracker publishes the step's trigger again ("nudges" the service; the barrier makes
  that harmless), up to a few times, then parks the saga for a person;
* answers a cancellation: refused once the point of no return is being passed, otherwise
  announced as the definition's `cancel_event`, to which the services react. The services hold
  the pivot step first (its compensating reaction); if they refuse, the saga runs on.
"""

from __future__ import annotations

import logging
from datetime import timedelta

from django.db import IntegrityError, transaction

from sagaplatform.kernel import attempts, choreography, outbox
from sagaplatform.kernel.commands import ACTION, COMPENSATE, SUCCEEDED

from ...definitions import SagaDefinition, StepSpec, for_context
from ...models import Saga, SagaStep
from ..run import CANCELLED, DB, IN_FLIGHT, JSON, QueueIdle, Run, SagaId, create_saga, load, park
from ..style import Style, register

logger = logging.getLogger(__name__)

State = SagaStep.State
MAX_NUDGES = 3
# The events the tracker records about holding the pivot (names kept from the order flow: they
# are on the wire and in stored histories).
HOLD_REQUESTED, HELD, HOLD_REFUSED = "dispatch_hold_requested", "dispatch_held", "cancellation_refused"


def track(*, message: JSON) -> None:
    """Record one published event (the tracker's task calls this). A malformed or unversioned
    event, or one of a schema the tracker does not know, is parked as a dead letter (alerted)."""
    problem = choreography.tracker_problem(message)
    if problem is not None:
        choreography.park(queue="orchestrator", task=choreography.TRACK_TASK, message=message, problem=problem)
        return
    ensure_saga(saga_id=message["saga_id"], context=message["context"])
    _track(message)


def _track(message: JSON) -> None:
    with transaction.atomic(using=DB):
        run = load(message["saga_id"], actor="tracker")
        if run is None:
            raise Saga.DoesNotExist(f"no saga {message['saga_id']}")
        steps = run.steps
        run.record("event_observed", data={"event": message["event"], "emitter": message.get("emitter")})
        emitter = message.get("emitter")
        if emitter and emitter.get("step") in steps:
            _observe_outcome(run, emitter, message)
        for reaction in choreography.subscribers(message["event"]):
            if reaction.step in steps:
                _observe_start(run, reaction, message)
        _lease_implied(run)
        _decide(run, message)
        run.flush()


def ensure_saga(*, saga_id: SagaId, context: JSON, definition: SagaDefinition | None = None) -> None:
    """Create the tracked saga on the first news of it (whichever event that is), from the
    definition its context names."""
    if Saga.objects.using(DB).filter(id=saga_id).exists():
        return
    try:
        with transaction.atomic(using=DB):
            # No deadline: no one could act on it; leases watch each step instead.
            run = create_saga(saga_id=saga_id, definition=definition or for_context(context), context=context, now=None)
            run.saga.start()
            run.saga.save(using=DB)
    except IntegrityError:
        pass  # created by a concurrent first event


def _walk(
    run: Run,
    step: SagaStep,
    target: str,
    *,
    error: JSON | None = None,
    result: JSON | None = None,
    data: JSON | None = None,
) -> bool:
    """Move a step to `target` along its state machine, through whatever the events skipped."""
    before = step.state
    if target in (State.SUCCEEDED, State.FAILED):
        if step.state == State.PENDING:
            step.dispatch()
            step.started_at = step.started_at or run.now
        if step.state not in (State.RUNNING, State.RETRYING):
            return False
        if target == State.SUCCEEDED:
            step.succeed(result=result or {})
        else:
            step.fail(error=error or {})
    elif target in (State.COMPENSATED, State.COMPENSATION_FAILED):
        if step.state == State.PENDING:
            return False  # it never ran: its compensation was the barrier's no-op
        if step.state in (State.SUCCEEDED, State.FAILED, State.RUNNING, State.RETRYING):
            step.begin_compensation()
        if step.state != State.COMPENSATING:
            return False
        if target == State.COMPENSATED:
            step.finish_compensation()
        else:
            step.give_up_compensation(error=error or {})
    step.finished_at, step.deadline_at, step.next_attempt_at = run.now, None, None
    run.record(f"step_{target}", step=step, from_state=before, data=data)
    return True


def _observe_outcome(run: Run, emitter: JSON, message: JSON) -> None:
    step = run.steps[emitter["step"]]
    status = emitter["status"]
    if status == "deferred":
        _deferred(run, step, emitter)
        return
    if status == "refused":
        # Its compensation came first: it never took effect and never will (the barrier).
        refusal = {"code": "compensated_before_action", "message": "refused: its compensation came first"}
        if _owes_undo(step):
            # Not the event owed: the undo's is, and only it ends the step's lease. (Failing the
            # step here would end the lease, and a lost undo event would stall the undo chain.)
            run.record("action_refused", step=step, data={"error": refusal})
            return
        _walk(run, step, State.FAILED, error={**refusal, "definitive": True})
        return
    failure = message.get("failure") or {}
    if emitter["op"] == ACTION:
        if status == SUCCEEDED:
            _walk(run, step, State.SUCCEEDED)
        else:
            undone = emitter.get("undone")
            # Definitive: a business failure, or a give-up whose undo proved it never ran.
            definitive = bool(emitter.get("definitive")) or undone == "null_compensation"
            _walk(run, step, State.FAILED, error={**failure, "definitive": definitive})
            if undone in ("null_compensation", "compensated") and not run.definition.step(step.name).pivot:
                # The service gave up and undid its own step at once.
                _walk(run, step, State.COMPENSATED, data={"null_compensation": undone == "null_compensation"})
    elif emitter["op"] == COMPENSATE:
        if step.state == State.PENDING:
            step.deadline_at = None  # the undo (or the hold) it was watched for has answered
            run.dirty.add(step.name)
        if run.definition.step(step.name).pivot:
            kind = HELD if status == SUCCEEDED else HOLD_REFUSED
            run.record(kind, step=step, data={"error": failure} if status != SUCCEEDED else {})
            if status != SUCCEEDED and step.state == State.PENDING:
                # Refused because the pivot had run: its event is owed.
                forward = next(r for r in choreography.reactions() if r.step == step.name and r.op == ACTION)
                step.trigger = None  # the hold's: ask for the pivot's own event instead
                _start_implied(run, step, forward, implied_by=step.name)
        elif status == SUCCEEDED:
            if step.state == State.PENDING and not emitter.get("null_compensation"):
                # A real undo: its action ran, and the news of it was lost on the way here.
                _walk(run, step, State.SUCCEEDED)
            _walk(run, step, State.COMPENSATED, data={"null_compensation": bool(emitter.get("null_compensation"))})
        else:
            _walk(run, step, State.COMPENSATION_FAILED, error=failure)


def _deferred(run: Run, step: SagaStep, emitter: JSON) -> None:
    """A service's reaction waits for a circuit breaker (`choreography.defer`): the timeline shows
    it as for a coordinated step, and the step's lease waits as long (no nudge meanwhile)."""
    data: JSON = {k: emitter[k] for k in ("breaker", "state", "resume_in", "attempt", "not_counted") if k in emitter}
    if emitter.get("not_counted"):
        step.deferrals += 1
    run.record("step_deferred", step=step, from_state=step.state, data=data)
    if step.deadline_at is not None:
        spec = run.definition.step(step.name)
        wait = float(emitter.get("resume_in") or 0) + spec.effective_timeout()
        step.deadline_at = max(step.deadline_at, run.now + timedelta(seconds=wait))
    run.dirty.add(step.name)


def _observe_start(run: Run, reaction: choreography.Reaction, message: JSON) -> None:
    step = run.steps[reaction.step]
    spec = run.definition.step(step.name)
    trigger = {
        "task": f"{reaction.service}.react",
        "queue": reaction.service,
        "payload": choreography.subscriber_copy(message, reaction),
    }
    if reaction.op == ACTION and step.state == State.PENDING:
        delay = reaction.start_delay()
        step.started_at = run.now
        if delay:
            step.next_attempt_at = run.now + timedelta(seconds=delay)
            run.record("step_scheduled", step=step, from_state=State.PENDING, data={"starts_in": delay})
        else:
            step.dispatch()
            run.record("step_started", step=step, from_state=State.PENDING, data={"event": message["event"]})
        if _owes_undo(step):
            # Its undo came first (the barrier refuses this late action): the undo's event is
            # still the one owed, so its lease stays.
            run.dirty.add(step.name)
        else:
            _watch(run, step, spec, trigger, delay=delay)
    elif reaction.op == COMPENSATE and spec.pivot:
        # Holding the point of no return is a guard, not an undo: the pivot either never
        # happens (the barrier refuses it, and we hear "refused") or already did (and the
        # services refuse the cancellation).
        run.record(HOLD_REQUESTED, step=step, data={"event": message["event"]})
    elif reaction.op == COMPENSATE and step.state in (State.SUCCEEDED, State.FAILED, State.RUNNING, State.RETRYING):
        before = step.state
        step.begin_compensation()
        run.record("compensation_started", step=step, from_state=before, data={"event": message["event"]})
        _watch(run, step, spec, trigger)
    elif reaction.op == COMPENSATE and step.state == State.PENDING:
        # Not heard to have run: its undo is most likely the barrier's no-op, but the undo chain
        # goes through it, so its event is owed all the same.
        run.record("compensation_expected", step=step, data={"event": message["event"]})
        _watch(run, step, spec, trigger)


def _owes_undo(step: SagaStep) -> bool:
    """The step is watched for its undo's event (or the pivot for the hold's answer)."""
    reaction = ((step.trigger or {}).get("payload") or {}).get("reaction")
    return step.deadline_at is not None and reaction == f"{step.name}:{COMPENSATE}"


def _lease_implied(run: Run) -> None:
    """Lease the steps that must have acted although their event never reached the tracker.

    A forward step is started only by the event of the one before it. So when the tracker has
    heard of a step (its start or its outcome) while the step before it is still pending here,
    that earlier event was published and its copy to the tracker lost: the earlier step is
    started and leased like any other, and its lease asks its service for the event again. A
    saga first heard of late in its flow (every earlier copy lost) is watched all the way back."""
    if run.saga.is_terminal:
        return  # a late event after the end: nothing is owed any more
    forward = [r for r in choreography.reactions() if r.op == ACTION and r.step in run.steps]
    implied = True
    while implied:
        implied = False
        for later in forward:
            if run.steps[later.step].state == State.PENDING:
                continue
            for earlier in forward:
                step = run.steps[earlier.step]
                if earlier.emits in later.on and step.state == State.PENDING:
                    _start_implied(run, step, earlier, implied_by=later.step)
                    implied = True


def _start_implied(run: Run, step: SagaStep, reaction: choreography.Reaction, *, implied_by: str) -> None:
    """Start and lease a step known to have run although the tracker missed its news; its trigger
    is rebuilt from the saga's context when the tracker never heard it either."""
    trigger = step.trigger or {
        "task": f"{reaction.service}.react",
        "queue": reaction.service,
        "payload": choreography.subscriber_copy(
            choreography.event_message(
                event=reaction.on[0], saga_id=run.saga.id, context=run.saga.context, failure=run.saga.failure
            ),
            reaction,
        ),
    }
    step.dispatch()
    step.started_at = step.started_at or run.now
    step.next_attempt_at = None
    run.record("step_started", step=step, from_state=State.PENDING, data={"implied_by": implied_by})
    _watch(run, step, run.definition.step(step.name), trigger)


def _watch(run: Run, step: SagaStep, spec: StepSpec, trigger: JSON, *, delay: float = 0.0) -> None:
    step.trigger = trigger
    step.deadline_at = run.now + timedelta(seconds=delay + spec.effective_timeout())
    run.dirty.add(step.name)


def _decide(run: Run, message: JSON) -> None:
    saga = run.saga
    actions = run.action_steps()
    finalizers = run.failure_steps()
    # The point of no return failed and we cannot tell whether it took effect, or a step after
    # it failed (nothing can be undone there): a person decides.
    pivot_failed = any(
        spec.pivot and step.state == State.FAILED and not (step.error or {}).get("definitive") for spec, step in actions
    )
    past_pivot = any(spec.pivot and step.state == State.SUCCEEDED for spec, step in actions)
    failed_after_pivot = past_pivot and any(step.state == State.FAILED for _, step in actions)
    if any(step.state == State.COMPENSATION_FAILED for _, step in actions) or pivot_failed or failed_after_pivot:
        if saga.state in (Saga.State.RUNNING, Saga.State.COMPENSATING):
            park(run, "A choreographed step failed where no service undoes it; look at its events")
        return
    hold = _hold(run)
    refused = hold is not None and message["event"] == hold.emits_on_failure
    if refused and saga.state == Saga.State.COMPENSATING:
        saga.abort_cancellation()
        saga.failure = None
        reason = run.definition.message("cancel_refused")
        run.record("saga_cancel_refused", from_state=Saga.State.COMPENSATING, data={"reason": reason})
        # Fall through: the rest of the flow may already have been heard while it was unwinding.
    if saga.state == Saga.State.RUNNING:
        # A step that failed, or is already being (or was) undone: the flow is unwinding.
        unwinding = (State.FAILED, State.COMPENSATING, State.COMPENSATED, State.COMPENSATION_FAILED)
        failed = [step for _, step in actions if step.state in unwinding]
        # The failure steps run only at the end of an unwinding flow: the events that showed
        # it may all have been lost on their way to the tracker.
        finalizing = [step for _, step in finalizers if step.state != State.PENDING]
        if failed or finalizing:
            failure = message.get("failure") or (failed[0].error if failed else None) or {}
            saga.begin_compensation(
                failure={
                    "step": failed[0].name if failed else failure.get("step"),
                    "code": failure.get("code"),
                    "message": failure.get("message"),
                }
            )
            run.record("saga_compensating", from_state=Saga.State.RUNNING, data={"failure": saga.failure})
        elif all(step.state == State.SUCCEEDED for _, step in actions):
            saga.complete()
            saga.finished_at = run.now
            run.record("saga_completed", from_state=Saga.State.RUNNING)
    if saga.state == Saga.State.COMPENSATING and all(step.state == State.SUCCEEDED for _, step in finalizers):
        if (saga.failure or {}).get("code") == CANCELLED:
            saga.finish_cancellation()
            run.record("saga_cancelled", from_state=Saga.State.COMPENSATING)
        else:
            saga.finish_compensation()
            run.record("saga_compensated", from_state=Saga.State.COMPENSATING)
        saga.finished_at = run.now


# --- What the engine asks of the tracker ----------------------------------------------------------


def nudge(run: Run, step: SagaStep) -> bool:
    """An expected event did not come in time: publish the step's trigger again, or give up."""
    if run.saga.state == Saga.State.PARKED:
        return False
    if run.saga.is_terminal:
        # The flow ended without the news of this step (it ran, or was never needed): there is
        # nothing left to ask for, and a finished saga cannot be parked.
        step.deadline_at = None
        run.dirty.add(step.name)
        return True
    if step.attempts - 1 >= MAX_NUDGES or not step.trigger:  # attempts: the first send, then nudges
        step.deadline_at = None
        run.record("event_missing", step=step, data={"nudges": step.attempts})
        park(run, f"No news from {step.name} after {step.attempts} nudge(s); the expected event is missing")
        return True
    step.attempts += 1
    spec = run.definition.step(step.name)
    step.deadline_at = run.now + timedelta(seconds=spec.effective_timeout())
    trigger = step.trigger
    outbox.enqueue(
        using=DB,
        task=trigger["task"],
        queue=trigger["queue"],
        payload={**trigger["payload"], "attempt": 1, "nudge": True},
        now=run.now,
    )
    run.record("event_nudged", step=step, data={"nudge": step.attempts})
    return True


def _pivot(run: Run) -> SagaStep | None:
    spec = next((spec for spec in run.definition.steps if spec.pivot), None)
    return run.steps[spec.name] if spec else None


def _hold(run: Run) -> choreography.Reaction | None:
    """The reaction that holds the pivot when a cancellation is announced (its failure event is
    the services' refusal of the cancellation)."""
    pivot = _pivot(run)
    if pivot is None:
        return None
    return next((r for r in choreography.reactions() if r.step == pivot.name and r.op == COMPENSATE), None)


def cancel(run: Run, failure: JSON) -> None:
    """Announce a cancellation to the services (the rules refused it once the point of no return
    is passed, being passed, or due within the definition's `cancel_margin`)."""
    pivot = _pivot(run)
    run.saga.begin_compensation(failure=failure)
    run.record("saga_cancel_requested", from_state=Saga.State.RUNNING, data={"reason": failure["message"]})
    message = choreography.event_message(
        event=run.definition.cancel_event, saga_id=run.saga.id, context=run.saga.context, failure=failure
    )
    choreography.publish(using=DB, message=message)
    hold = _hold(run)
    if pivot is None or hold is None:
        return
    # The hold's answer (held, or refused) is owed: watch for it in place of the pivot's own
    # event, which is not to be asked for any more.
    trigger = {
        "task": f"{hold.service}.react",
        "queue": hold.service,
        "payload": choreography.subscriber_copy(message, hold),
    }
    _watch(run, pivot, run.definition.step(pivot.name), trigger)


def operator_retry(run: Run) -> None:
    """Resume a parked choreographed saga: nudge again every step that stopped."""
    compensating = any(step.state == State.COMPENSATION_FAILED for _, step in run.action_steps())
    if compensating:
        run.saga.resume_compensation()
    else:
        run.saga.resume_forward()
    for _, step in run.action_steps():
        if step.state == State.COMPENSATION_FAILED:
            step.retry_compensation()
        if step.state in IN_FLIGHT and step.trigger:
            step.attempts = 0
            nudge(run, step)


def announce_skip(run: Run, step: SagaStep) -> None:
    """An operator settled a compensation by hand: publish what its reaction would have, so the
    rest of the choreographed undo goes on."""
    undo = next((r for r in choreography.reactions() if r.step == step.name and r.op == COMPENSATE and r.emits), None)
    if undo is None or undo.emits is None:  # (the search asked for one that emits)
        return
    emitter = {"service": undo.service, "step": step.name, "op": COMPENSATE, "status": SUCCEEDED, "skipped": True}
    choreography.publish(
        using=DB,
        message=choreography.event_message(
            event=undo.emits, saga_id=run.saga.id, context=run.saga.context, failure=run.saga.failure, emitter=emitter
        ),
    )


class Choreography(Style):
    name = "choreography"
    coordinated = False  # the services start their own steps; the tracker only records

    def advance(self, run: Run) -> None:
        pass  # no coordinator: the services decide, the tracker records (`track`)

    def lease_expired(
        self, run: Run, step: SagaStep, *, mark: attempts.Mark | None, known: bool, queue_idle: QueueIdle | None
    ) -> bool:
        return nudge(run, step)

    def cancel(self, run: Run, failure: JSON) -> None:
        cancel(run, failure)

    def start_cancelled(self, *, saga_id: SagaId, definition: SagaDefinition, context: JSON, failure: JSON) -> bool:
        ensure_saga(saga_id=saga_id, context=context, definition=definition)
        return False  # it runs now: the cancel is announced to the services like any other

    def retry_parked(self, run: Run, reason: str) -> None:
        run.record("operator_retry", from_state=Saga.State.PARKED, data={"reason": reason})
        operator_retry(run)

    def retry_waiting(self, run: Run, steps: list[tuple[StepSpec, SagaStep]]) -> None:
        for _, step in steps:
            if step.trigger:
                nudge(run, step)

    def skipped(self, run: Run, step: SagaStep) -> None:
        announce_skip(run, step)


register(Choreography())
