"""Orchestrated: the engine runs the definition's graph, a step once every step it depends on is
done (in sequence, or side by side: "parallel" is only the shape of the graph), and compensates
in reverse dependency order when a step fails before the point of no return. Past it (or not
knowing whether it was passed), the saga only goes forward, or waits parked for a person."""

from __future__ import annotations

from sagaplatform.kernel import attempts
from sagaplatform.kernel.commands import COMPENSATE, CONFIRM

from ...definitions import SagaDefinition, StepSpec
from ...models import Saga, SagaStep
from .. import lifecycle
from ..flow import advance_compensation, retry_now, start_ready
from ..replies import expire_lease
from ..run import JSON, QueueIdle, Run, SagaId, State, lease, park, send
from ..style import Style, register


class Orchestrated(Style):
    name = "orchestrated"

    def label(self, definition: SagaDefinition) -> str:
        return "parallel" if definition.parallel else self.name

    def advance(self, run: Run) -> None:
        saga = run.saga
        if saga.state == Saga.State.RUNNING:
            failed = [(spec, step) for spec, step in run.action_steps() if step.state == State.FAILED]
            unknown_pivot = [s for spec, s in failed if spec.pivot and not (s.error or {}).get("definitive")]
            if failed and (run.past_pivot() or unknown_pivot):
                # Forward only: past the point of no return, or not knowing whether we passed it.
                park(run, f"{failed[0][1].name} failed at or after the point of no return; retry it once fixed")
            elif failed:
                error = failed[0][1].error or {}
                saga.begin_compensation(
                    failure={"step": failed[0][1].name, "code": error.get("code"), "message": error.get("message")}
                )
                run.record("saga_compensating", from_state=Saga.State.RUNNING, data={"failure": saga.failure})
            else:
                start_ready(run, run.action_steps())
                if all(step.state == State.SUCCEEDED for _, step in run.action_steps()):
                    saga.complete()
                    saga.finished_at, saga.deadline_at = run.now, None
                    run.record("saga_completed", from_state=Saga.State.RUNNING)
                return
        if saga.state == Saga.State.COMPENSATING:
            advance_compensation(run)

    def lease_expired(
        self, run: Run, step: SagaStep, *, mark: attempts.Mark | None, known: bool, queue_idle: QueueIdle | None
    ) -> bool:
        return expire_lease(run, step, mark=mark, known=known, queue_idle=queue_idle)

    def cancel(self, run: Run, failure: JSON) -> None:
        run.saga.begin_compensation(failure=failure)
        run.record("saga_cancel_requested", from_state=Saga.State.RUNNING, data={"reason": failure["message"]})

    def start_cancelled(self, *, saga_id: SagaId, definition: SagaDefinition, context: JSON, failure: JSON) -> bool:
        return lifecycle.saga_start(saga_id=saga_id, definition=definition.name, context=context, cancel=failure)

    def decided(self, run: Run) -> bool:
        """The saga is past a decision that a resumed saga must not take again."""
        return False

    def retry_parked(self, run: Run, reason: str) -> None:
        saga = run.saga
        given_up = [s for _, s in run.action_steps() if s.state == State.COMPENSATION_FAILED]
        unconfirmed = [s for _, s in run.action_steps() if s.state == State.CONFIRM_FAILED]
        if unconfirmed:
            saga.resume_confirm()
            run.record("operator_retry", from_state=Saga.State.PARKED, data={"reason": reason})
            for step in unconfirmed:
                spec = run.definition.step(step.name)
                step.retry_confirm()
                lease(run, step, spec)
                run.record(
                    "confirm_started",
                    step=step,
                    from_state=State.CONFIRM_FAILED,
                    data={"attempt": step.confirm_attempts},
                )
                send(run, step, spec, CONFIRM, attempt=step.confirm_attempts)
        elif given_up:
            saga.resume_compensation()
            run.record("operator_retry", from_state=Saga.State.PARKED, data={"reason": reason})
            for step in given_up:
                spec = run.definition.step(step.name)
                step.retry_compensation()
                lease(run, step, spec)
                run.record(
                    "compensation_started",
                    step=step,
                    from_state=State.COMPENSATION_FAILED,
                    data={"attempt": step.compensation_attempts},
                )
                send(run, step, spec, COMPENSATE, attempt=step.compensation_attempts)
        else:
            if self.decided(run):
                saga.resume_confirm()
            elif saga.failure:  # parked while compensating (saga_park_broken)
                saga.resume_compensation()
            else:
                saga.resume_forward()
            run.record("operator_retry", from_state=Saga.State.PARKED, data={"reason": reason})
            for spec, step in run.action_steps():
                if step.state == State.FAILED and saga.state != Saga.State.COMPENSATING:
                    retry_now(run, spec, step)

    def retry_waiting(self, run: Run, steps: list[tuple[StepSpec, SagaStep]]) -> None:
        for spec, step in steps:
            if step.state == State.COMPENSATING:
                step.schedule_compensation_retry(error=step.error or {}, next_attempt_at=None)
                lease(run, step, spec)
                send(run, step, spec, COMPENSATE, attempt=step.compensation_attempts)
            elif step.state == State.CONFIRMING:
                step.schedule_confirm_retry(error=step.error or {}, next_attempt_at=None)
                lease(run, step, spec)
                send(run, step, spec, CONFIRM, attempt=step.confirm_attempts)
            else:
                retry_now(run, spec, step)


register(Orchestrated())
