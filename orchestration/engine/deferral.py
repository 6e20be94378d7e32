"""The engine's side of the circuit breakers (`sagaplatform/kernel/breakers.py`): each step's
reply counts for its service's breaker, and while a service's breaker refuses calls its steps
wait instead of failing.

* A step about to start (`defer_start`) waits with `next_attempt_at` set to when the breaker may
  admit again plus a jitter spread over BREAKER_RESUME_SPREAD; the sweeper starts it then (and
  asks the breaker again). No attempt is made, so none is consumed.
* A transient failure that arrives while the breaker refuses calls (`hold_retry`) is not counted
  against the step's retries (`SagaStep.deferrals`), and its next attempt waits as above.

Each deferral is a `step_deferred` event in the saga's timeline.
"""

from __future__ import annotations

from datetime import timedelta
from typing import TYPE_CHECKING

from sagaplatform.kernel import breakers
from sagaplatform.kernel.commands import TRANSIENT_ERROR

if TYPE_CHECKING:
    from ..definitions import StepSpec
    from ..models import SagaStep
    from .run import Run


def record_reply(service: str, status: str) -> None:
    """A reply (or a timed-out attempt) from `service`: transient errors count as failures;
    successes and business failures (the service answered) as successes."""
    breakers.record(service, status != TRANSIENT_ERROR)


def defer_start(run: Run, step: SagaStep, spec: StepSpec) -> bool:
    verdict = breakers.admit(spec.service)
    if verdict.admitted:
        return False
    delay = breakers.resume_delay(verdict)
    step.next_attempt_at = run.now + timedelta(seconds=delay)
    run.record(
        "step_deferred",
        step=step,
        from_state=step.state,
        data={"breaker": spec.service, "state": verdict.state, "resume_in": round(delay, 3), "attempt": 0},
    )
    return True


def hold_retry(run: Run, step: SagaStep, spec: StepSpec) -> float:
    """Seconds the next attempt of a step that just failed transiently must wait for its
    service's breaker (0: it may go as usual). A held failure does not count."""
    verdict = breakers.admit(spec.service)
    if verdict.admitted:
        return 0.0
    step.deferrals += 1
    delay = breakers.resume_delay(verdict)
    run.record(
        "step_deferred",
        step=step,
        from_state=step.state,
        data={
            "breaker": spec.service,
            "state": verdict.state,
            "resume_in": round(delay, 3),
            "attempt": step.attempts,
            "not_counted": True,
        },
    )
    return delay
