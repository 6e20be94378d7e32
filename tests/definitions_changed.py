"""The order definitions as a later deploy changes them (`SAGA_DEFINITIONS_MODULE`), each under
version 2: a step added, one renamed, one removed, a compensation changed. The operations they
name are the services' own, so the platform can run them; `tests/e2e/test_definition_versions_e2e.py`
restarts the workers on this module while sagas of version 1 are in flight."""

from __future__ import annotations

from dataclasses import replace

from orchestration.definitions import RetryPolicy, SagaDefinition, StepSpec

# The changed compensation: the stock is released on a policy of its own.
RELEASE_RETRY = RetryPolicy(max_attempts=12, initial_interval=0.2, max_interval=20.0)
# The added step: the order is checked before anything is reserved.
CHECK_ORDER = StepSpec("check_order", "orders", "check_pending", "release_check")


def _changed_steps(steps: tuple[StepSpec, ...], *, add: bool) -> tuple[StepSpec, ...]:
    changed = []
    for spec in steps:
        if spec.name == "notify_customer":
            continue  # removed
        if spec.name == "mark_shipped":
            spec = replace(spec, name="ship_order")  # renamed
        if spec.name == "reserve_stock":
            spec = replace(spec, compensation_retry=RELEASE_RETRY)  # its compensation changed
            if add:
                spec = replace(spec, depends_on=("check_order",))
        changed.append(spec)
    return (CHECK_ORDER, *changed) if add else tuple(changed)


def _v2(definition: SagaDefinition, **changes) -> SagaDefinition:
    return replace(definition, version="2", _index={}, **changes)


def modes(current: dict[str, SagaDefinition]) -> dict[str, SagaDefinition]:
    orchestrated, parallel = current["orchestrated"], current["parallel"]
    tcc, choreography = current["tcc"], current["choreography"]
    return {
        "orchestrated": _v2(orchestrated, steps=_changed_steps(orchestrated.steps, add=True)),
        "parallel": _v2(parallel, steps=_changed_steps(parallel.steps, add=False)),
        # TCC: the confirmation message goes under another name; the stock release changes.
        "tcc": _v2(
            tcc,
            steps=tuple(
                replace(s, name="tell_customer")
                if s.name == "notify_customer"
                else replace(s, compensation_retry=RELEASE_RETRY)
                if s.name == "reserve_stock"
                else s
                for s in tcc.steps
            ),
        ),
        # Choreography: the services' reactions name the steps, so the tracker's model can only
        # lose one: it no longer follows the customer's notification.
        "choreography": _v2(choreography, steps=tuple(s for s in choreography.steps if s.name != "notify_customer")),
    }
