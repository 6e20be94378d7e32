"""TCC (try-confirm-cancel): try every participant (the steps with a `confirm`) at once; if all
tried, confirm all (no way back); if any try failed, cancel all, including tries still in flight
(the barrier refuses a try that arrives after its cancel). The other steps run once every
participant is confirmed. Replies, leases and operator actions are the orchestrated style's."""

from __future__ import annotations

from sagaplatform.kernel.commands import COMPENSATE, CONFIRM

from ...definitions import SagaDefinition
from ...models import Saga
from ..flow import advance_compensation, needs_compensation, start_ready
from ..run import Run, State, lease, park, send
from ..style import register
from .orchestrated import Orchestrated


class TCC(Orchestrated):
    name = "tcc"

    def label(self, definition: SagaDefinition) -> str:
        return self.name

    def decided(self, run: Run) -> bool:
        # After the confirms the saga is in its confirm phase, not trying any more.
        return all(step.state == State.CONFIRMED for spec, step in run.action_steps() if spec.confirm)

    def advance(self, run: Run) -> None:
        saga = run.saga
        participants = [(spec, step) for spec, step in run.action_steps() if spec.confirm]
        followers = [(spec, step) for spec, step in run.action_steps() if not spec.confirm]
        if saga.state == Saga.State.RUNNING:
            failed = [step for _, step in participants if step.state == State.FAILED]
            if failed:
                error = failed[0].error or {}
                saga.begin_compensation(
                    failure={"step": failed[0].name, "code": error.get("code"), "message": error.get("message")}
                )
                run.record("saga_compensating", from_state=Saga.State.RUNNING, data={"failure": saga.failure})
            else:
                start_ready(run, participants)
                if all(step.state == State.SUCCEEDED for _, step in participants):
                    saga.begin_confirm()
                    saga.deadline_at = None  # decided: from here only forward
                    run.record("saga_confirming", from_state=Saga.State.RUNNING)
                    for spec, step in participants:
                        step.begin_confirm()
                        lease(run, step, spec)
                        run.record("confirm_started", step=step, from_state=State.SUCCEEDED, data={"attempt": 1})
                        send(run, step, spec, CONFIRM, attempt=1)
                return
        if saga.state == Saga.State.CONFIRMING:
            if any(step.state == State.CONFIRM_FAILED for _, step in participants):
                park(run, "A confirm keeps failing; the transaction is decided, retry it once fixed")
                return
            if not all(step.state == State.CONFIRMED for _, step in participants):
                return
            start_ready(run, followers)
            if any(step.state == State.FAILED for _, step in followers):
                park(run, "A step after the confirms failed; retry it once fixed")
            elif all(step.state == State.SUCCEEDED for _, step in followers):
                saga.complete()
                saga.finished_at = run.now
                run.record("saga_completed", from_state=Saga.State.CONFIRMING)
            return
        if saga.state == Saga.State.COMPENSATING:
            for spec, step in participants:
                in_flight = step.state in (State.RUNNING, State.RETRYING)
                if in_flight or needs_compensation(spec, step):
                    before = step.state
                    step.begin_compensation()
                    lease(run, step, spec)
                    run.record(
                        "compensation_started",
                        step=step,
                        from_state=before,
                        data={"attempt": 1, "cancel_in_flight": in_flight},
                    )
                    send(run, step, spec, COMPENSATE, attempt=1)
            advance_compensation(run)


register(TCC())
