"""The engine's side of the circuit breakers (`sagaplatform/kernel/breakers.py`): each step's
reply counts for its service's breaker, and while a service's breaker refuses calls its steps
wait instead of failing.

* A step about to start (`defer_starts`) waits with `next_attempt_at` set to when the breaker may
  admit again plus a jitter spread over BREAKER_RESUME_SPREAD; the sweeper starts it then (and
  asks the breaker again). No attempt is made, so none is consumed.
* A transient failure that arrives while the breaker refuses calls (`hold_retry`) is not counted
  against the step's retries (`SagaStep.deferrals`), and its next attempt waits as above.

Each deferral is a `step_deferred` event in the saga's timeline.

The same two hooks make a step wait while no live instance of its service is registered
(`sagaplatform/kernel/registry.py`): `data.reason` is then `no_live_instance`. Such a wait asks
the registry again every SAGA_NO_WORKER_RECHECK seconds, records one event per wait (not one
per check), and lasts at most SAGA_NO_WORKER_WAIT_LIMIT seconds in all per step (counted from
its first such wait); after that the step goes ahead as without a registry. While it waits, the
saga's deadline is pushed back, so that the time the saga had left when the wait began is left
when it ends (to within a sweep).
"""

from __future__ import annotations

import logging
import random
from datetime import datetime, timedelta
from typing import TYPE_CHECKING

from django.conf import settings

from sagaplatform.kernel import breakers, registry
from sagaplatform.kernel.commands import TRANSIENT_ERROR

from ..models import SagaEvent

if TYPE_CHECKING:
    from ..definitions import StepSpec
    from ..models import SagaStep
    from .run import JSON, Run

logger = logging.getLogger(__name__)
NO_LIVE_INSTANCE = "no_live_instance"


def record_reply(service: str, status: str) -> None:
    """A reply (or a timed-out attempt) from `service`: transient errors count as failures;
    successes and business failures (the service answered) as successes."""
    breakers.record(service, status != TRANSIENT_ERROR)


def defer_starts(run: Run, due: list[tuple[StepSpec, SagaStep]]) -> set[str]:
    """The names of the steps of `due` (about to start, in order) that must wait: no live
    instance of their service, or its breaker refuses calls. The breakers of the steps that
    passed the first check are asked in one Redis round trip (`breakers.admit_many`), in order."""
    waiting: set[str] = set()
    asking: list[tuple[StepSpec, SagaStep]] = []
    for spec, step in due:
        wait = wait_for_instance(run, step, spec, held=False)
        if wait:
            step.next_attempt_at = run.now + timedelta(seconds=wait)
            waiting.add(step.name)
        else:
            asking.append((spec, step))
    verdicts = breakers.admit_many([spec.service for spec, _ in asking])
    for (spec, step), verdict in zip(asking, verdicts, strict=True):
        if verdict.admitted:
            continue
        delay = breakers.resume_delay(verdict)
        step.next_attempt_at = run.now + timedelta(seconds=delay)
        run.record(
            "step_deferred",
            step=step,
            from_state=step.state,
            data={"breaker": spec.service, "state": verdict.state, "resume_in": round(delay, 3), "attempt": 0},
        )
        waiting.add(step.name)
    return waiting


def hold_retry(run: Run, step: SagaStep, spec: StepSpec) -> float:
    """Seconds the next attempt of a step that just failed transiently must wait for its
    service's breaker, or for a live instance of its service (0: it may go as usual). A held
    failure does not count."""
    wait = wait_for_instance(run, step, spec, held=True)
    if wait:
        return wait
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


def wait_for_instance(run: Run, step: SagaStep, spec: StepSpec, *, held: bool) -> float:
    """Seconds `step` must wait because no live instance of its service is registered (0: go).
    `held`: a transient failure is being held (not counted against the retries)."""
    if settings.SAGA_NO_WORKER_WAIT_LIMIT <= 0 or registry.resolve(spec.service).live is not False:
        return 0.0  # served, unknown (no registry: as without one), or waiting is off
    first, latest = _wait_events(run, step)
    since = datetime.fromisoformat(first["since"]) if first else run.now
    waited = (run.now - since).total_seconds()
    if waited >= settings.SAGA_NO_WORKER_WAIT_LIMIT:
        logger.warning(
            "step %s: no live instance of %s for %.0f s; going ahead",
            step.name,
            spec.service,
            waited,
            extra={"saga_id": str(run.saga.id), "step": step.name},
        )
        return 0.0
    delay = max(0.05, settings.SAGA_NO_WORKER_RECHECK * random.uniform(1.0, 1.25))  # a little jitter; never 0 (go)
    continuing = latest is not None and not held
    remaining = (
        float(latest["deadline_left"]) if continuing and latest and latest.get("deadline_left") is not None else None
    )
    if remaining is None and run.saga.deadline_at is not None:
        remaining = max(0.0, (run.saga.deadline_at - run.now).total_seconds())
    if remaining is not None and run.saga.deadline_at is not None:
        # The deadline does not run while the step waits: the time left when the wait began
        # stays left after the next check.
        resume = run.now + timedelta(seconds=delay + remaining)
        run.saga.deadline_at = max(run.saga.deadline_at, resume)
    if held:
        step.deferrals += 1
    if continuing:
        run.dirty.add(step.name)  # the same wait: no new event for each check
        return delay
    run.record(
        "step_deferred",
        step=step,
        from_state=step.state,
        data={
            "reason": NO_LIVE_INSTANCE,
            "service": spec.service,
            "message": f"no live instance of {spec.service}",
            "since": since.isoformat(),
            "resume_in": round(delay, 3),
            "deadline_left": None if remaining is None else round(remaining, 3),
            "attempt": step.attempts,
            **({"not_counted": True} if held else {}),
        },
    )
    return delay


def _wait_events(run: Run, step: SagaStep) -> tuple[JSON | None, JSON | None]:
    """The data of the step's first no-live-instance deferral, and of its latest event if that is
    one (the step is still in that wait)."""
    events = SagaEvent.objects.using("default").filter(saga=run.saga, step=step.name)
    first = (
        events.filter(kind="step_deferred", data__reason=NO_LIVE_INSTANCE)
        .order_by("seq")
        .values_list("data", flat=True)
        .first()
    )
    if first is None:
        return None, None
    latest = events.order_by("-seq").values_list("kind", "data").first()
    in_wait = latest is not None and latest[0] == "step_deferred" and latest[1].get("reason") == NO_LIVE_INSTANCE
    return first, latest[1] if in_wait and latest else None
