"""Saga definitions in Python: a saga is a DAG of steps.

Each step names its service, the operation to run, the operation that compensates it, its retry
policies and what it depends on. `on_failure` steps run, in their own dependency order, once
every completed step has been compensated (they tell the order and the customer why).
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

from django.conf import settings


@dataclass(frozen=True)
class RetryPolicy:
    """Exponential backoff: min(max_interval, initial_interval * coefficient ** (n - 1)) before
    attempt n + 1, with full jitter (a uniform draw below that bound) so that retries of many
    sagas spread out instead of arriving together."""

    max_attempts: int = 5
    initial_interval: float = 0.5
    coefficient: float = 2.0
    max_interval: float = 30.0
    jitter: bool = True

    def __post_init__(self) -> None:
        if self.max_attempts < 1 or self.initial_interval < 0 or self.coefficient < 1 or self.max_interval < 0:
            raise ValueError(f"invalid retry policy {self}")

    def ceiling(self, failed_attempt: int) -> float:
        try:
            return min(self.max_interval, self.initial_interval * self.coefficient ** (failed_attempt - 1))
        except OverflowError:  # a policy that retries for a long time is past its cap anyway
            return self.max_interval

    def delay(self, failed_attempt: int) -> float:
        bound = self.ceiling(failed_attempt)
        return random.uniform(0, bound) if self.jitter else bound

    def allows_another(self, attempts_so_far: int) -> bool:
        return attempts_so_far < self.max_attempts


@dataclass(frozen=True)
class StepSpec:
    name: str
    service: str
    action: str
    compensation: str | None = None
    depends_on: tuple[str, ...] = ()
    retry: RetryPolicy = RetryPolicy()
    compensation_retry: RetryPolicy = RetryPolicy(max_attempts=10, max_interval=60.0)
    # Keys of the saga context the service receives (least privilege: only the payments
    # service sees the payment token).
    inputs: tuple[str, ...] = ("order_id",)
    # Start-to-close timeout of one attempt: past it with no reply, the attempt counts as a
    # transient failure (the barrier makes a late reply harmless).
    timeout: float = 30.0
    # The point of no return: once it has succeeded the saga only goes forward.
    pivot: bool = False

    def effective_timeout(self) -> float:
        override = settings.SAGA_STEP_TIMEOUT_OVERRIDE
        return min(self.timeout, override) if override else self.timeout


@dataclass(frozen=True)
class SagaDefinition:
    name: str
    steps: tuple[StepSpec, ...]
    on_failure: tuple[StepSpec, ...] = ()
    description: str = ""
    # Global deadline in seconds from the start: before the pivot the saga is compensated,
    # after it the deadline no longer applies.
    deadline: float = 600.0
    _index: dict = field(default_factory=dict, compare=False, repr=False)

    def __post_init__(self) -> None:
        for group in (self.steps, self.on_failure):
            names = [s.name for s in group]
            if len(set(names)) != len(names):
                raise ValueError(f"{self.name}: duplicate step names")
            seen: set[str] = set()
            for spec in group:
                missing = set(spec.depends_on) - seen
                if missing:
                    raise ValueError(f"{self.name}.{spec.name} depends on unknown or later steps {sorted(missing)}")
                seen.add(spec.name)
        all_names = [s.name for s in (*self.steps, *self.on_failure)]
        if len(set(all_names)) != len(all_names):
            raise ValueError(f"{self.name}: a failure step shares a name with a step")
        self._index.update({s.name: s for s in (*self.steps, *self.on_failure)})

    def effective_deadline(self) -> float:
        return settings.SAGA_DEADLINE_OVERRIDE or self.deadline

    def step(self, name: str) -> StepSpec:
        return self._index[name]

    def dependents(self, name: str) -> list[StepSpec]:
        return [s for s in self.steps if name in s.depends_on]


PLACE_ORDER = SagaDefinition(
    name="place_order",
    description="Reserve stock, take payment, approve the order, book shipping, tell the customer.",
    steps=(
        StepSpec("reserve_stock", "inventory", "reserve", "release", inputs=("order_id", "items")),
        StepSpec(
            "charge_payment",
            "payments",
            "charge",
            "refund",
            depends_on=("reserve_stock",),
            inputs=("order_id", "amount", "currency", "payment_token"),
        ),
        StepSpec("approve_order", "orders", "approve", "revoke", depends_on=("charge_payment",)),
        StepSpec(
            "schedule_shipment",
            "shipping",
            "schedule",
            "cancel",
            depends_on=("approve_order",),
            inputs=("order_id", "shipping_address"),
            pivot=True,
        ),
        StepSpec(
            "notify_customer",
            "notifications",
            "send_confirmation",
            depends_on=("schedule_shipment",),
            inputs=("order_id", "customer_email", "shipping_address"),
            retry=RetryPolicy(max_attempts=10, max_interval=60.0),
        ),
    ),
    on_failure=(
        StepSpec("reject_order", "orders", "reject", retry=RetryPolicy(max_attempts=20, max_interval=60.0)),
        StepSpec(
            "notify_failure",
            "notifications",
            "send_failure",
            depends_on=("reject_order",),
            inputs=("order_id", "customer_email", "shipping_address"),
            retry=RetryPolicy(max_attempts=20, max_interval=60.0),
        ),
    ),
)

DEFINITIONS: dict[str, SagaDefinition] = {d.name: d for d in (PLACE_ORDER,)}


def get_definition(name: str) -> SagaDefinition:
    try:
        return DEFINITIONS[name]
    except KeyError:
        raise LookupError(f"no saga definition named {name!r}") from None
