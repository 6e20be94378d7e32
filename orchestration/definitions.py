"""Saga definitions in Python: a saga is a DAG of steps.

Each step names its service, the operation to run, the operation that compensates it, its retry
policies and what it depends on. `on_failure` steps run, in their own dependency order, once
every completed step has been compensated (they tell the order and the customer why).
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import random
from dataclasses import dataclass, field
from functools import cached_property
from importlib import import_module
from typing import TYPE_CHECKING

from django.conf import settings

from sagaplatform.api import ApiError
from sagaplatform.kernel import events

if TYPE_CHECKING:
    from .models import DefinitionSnapshot  # models import this module


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
        cap = min(self.max_interval, settings.SAGA_RETRY_MAX_INTERVAL_OVERRIDE or self.max_interval)
        try:
            return min(cap, self.initial_interval * self.coefficient ** (failed_attempt - 1))
        except OverflowError:  # a policy that retries for a long time is past its cap anyway
            return cap

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
    # service sees the payment method's reference; the card token is never in the context).
    inputs: tuple[str, ...] = ("order_id",)
    # Start-to-close timeout of one attempt: past it with no reply, the attempt counts as a
    # transient failure (the barrier makes a late reply harmless).
    timeout: float = 30.0
    # The point of no return: once it has succeeded the saga only goes forward.
    pivot: bool = False
    # TCC: the operation that confirms the try (`action`); `compensation` cancels it.
    confirm: str | None = None
    confirm_retry: RetryPolicy = RetryPolicy(max_attempts=30, max_interval=60.0)
    # Wait this long (seconds, or the name of a setting) after the step is ready before starting
    # it; meanwhile it is cancellable like any step not yet started (a handling window).
    start_after: float | str = 0.0

    def start_delay(self) -> float:
        return float(getattr(settings, self.start_after)) if isinstance(self.start_after, str) else self.start_after

    def effective_timeout(self) -> float:
        override = settings.SAGA_STEP_TIMEOUT_OVERRIDE
        return min(self.timeout, override) if override else self.timeout


GENERIC_MESSAGES = {
    "cancelled": "Cancelled on request",
    "deadline_exceeded": "The saga took too long to complete",
    "cancel_refused": "the point of no return was passed",
}


@dataclass(frozen=True)
class SagaDefinition:
    name: str
    steps: tuple[StepSpec, ...]
    on_failure: tuple[StepSpec, ...] = ()
    description: str = ""
    # orchestrated: the engine runs the DAG and compensates in reverse dependency order.
    # tcc: try every participant (steps with `confirm`) at once, then confirm all or cancel all;
    #      the other steps run after the confirms.
    # choreography: no coordinator; the engine only tracks what the services report.
    style: str = "orchestrated"
    # What a completed saga leaves behind, for the audit.
    outcome: dict = field(default_factory=lambda: {"order": "shipped", "shipment": "dispatched"})
    # Global deadline in seconds from the start: before the pivot the saga is compensated,
    # after it the deadline no longer applies.
    deadline: float = 600.0
    # What a cancellation or a passed deadline says (see GENERIC_MESSAGES).
    messages: dict = field(default_factory=dict)
    # A cancel this many seconds or less before the pivot's scheduled start is refused: the
    # style cannot stop the pivot that late (choreography: the services would race it).
    cancel_margin: float = 0.0
    # The refusal messages of operator actions, by code (`orchestration/rules.py`); `{state}`
    # is the saga's state. Codes missing here get the generic message.
    refusals: dict = field(default_factory=dict)
    # Choreography: the event that announces a cancellation to the services.
    cancel_event: str = ""
    # The human half of the definition's version (`label`); the other half is the content hash
    # (`digest`). Bump it with every change to the definition: `manage.py check --database
    # default` fails when the content changed under a label a saga still runs.
    version: str = "1"
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

    def graph(self) -> dict:
        """The definition as data (JSON): what a saga's version snapshot stores. A copy of its
        own for the caller."""
        return copy.deepcopy(self._graph)

    @cached_property
    def _graph(self) -> dict:
        # Built once: every saga's start records it (`record`), and a definition never changes.
        data = dataclasses.asdict(self)
        data.pop("_index")
        return json.loads(json.dumps(data))

    @cached_property
    def digest(self) -> str:
        """The content hash: sha256 of the canonical JSON of `graph()`."""
        return hashlib.sha256(json.dumps(self._graph, sort_keys=True, separators=(",", ":")).encode()).hexdigest()

    @property
    def label(self) -> str:
        return f"{self.name} v{self.version}"

    @classmethod
    def from_graph(cls, data: dict) -> SagaDefinition:
        """Rebuild a definition from `graph()` (a stored snapshot). A field the code no longer
        has is left out, and one added since takes its default."""

        def known(kind, raw: dict) -> dict:
            names = {f.name for f in dataclasses.fields(kind)} - {"_index"}
            return {k: v for k, v in raw.items() if k in names}

        def policy(raw: dict | None) -> RetryPolicy:
            return RetryPolicy(**known(RetryPolicy, raw or {}))

        def step(raw: dict) -> StepSpec:
            return StepSpec(
                **{
                    **known(StepSpec, raw),
                    "depends_on": tuple(raw.get("depends_on", ())),
                    "inputs": tuple(raw.get("inputs", ("order_id",))),
                    "retry": policy(raw.get("retry")),
                    "compensation_retry": policy(raw.get("compensation_retry")),
                    "confirm_retry": policy(raw.get("confirm_retry")),
                }
            )

        fields = known(cls, data)
        return cls(
            **{
                **fields,
                "steps": tuple(step(s) for s in data["steps"]),
                "on_failure": tuple(step(s) for s in data["on_failure"]),
            }
        )

    @property
    def parallel(self) -> bool:
        """Some steps run side by side: more than one step waits for nothing."""
        return sum(1 for s in self.steps if not s.depends_on) > 1

    def message(self, key: str) -> str:
        return self.messages.get(key) or GENERIC_MESSAGES[key]

    def participants(self) -> list[StepSpec]:
        return [s for s in self.steps if s.confirm]

    def effective_deadline(self) -> float:
        return settings.SAGA_DEADLINE_OVERRIDE or self.deadline

    def step(self, name: str) -> StepSpec:
        return self._index[name]

    def has_step(self, name: str) -> bool:
        return name in self._index

    def dependents(self, name: str) -> list[StepSpec]:
        return [s for s in self.steps if name in s.depends_on]


def _order_steps(*, parallel: bool) -> tuple[StepSpec, ...]:
    """The order flow. Sequential: stock, then payment. Parallel: both at once (they do not
    depend on each other), approval once both are done."""
    return (
        StepSpec("reserve_stock", "inventory", "reserve", "release", inputs=("order_id", "items")),
        StepSpec(
            "charge_payment",
            "payments",
            "charge",
            "refund",
            depends_on=() if parallel else ("reserve_stock",),
            inputs=("order_id", "amount", "currency", "payment_method"),
        ),
        StepSpec(
            "approve_order",
            "orders",
            "approve",
            "revoke",
            depends_on=("reserve_stock", "charge_payment") if parallel else ("charge_payment",),
        ),
        StepSpec(
            "schedule_shipment",
            "shipping",
            "schedule",
            "cancel",
            depends_on=("approve_order",),
            inputs=("order_id", "shipping_address"),
        ),
        # The point of no return: the parcel leaves the warehouse after a handling window in
        # which the customer may still cancel. No compensation: goods in transit stay shipped.
        StepSpec(
            "dispatch_shipment",
            "shipping",
            "dispatch",
            depends_on=("schedule_shipment",),
            pivot=True,
            start_after="SHIPPING_HANDLING_SECONDS",
            retry=RetryPolicy(max_attempts=10, max_interval=60.0),
        ),
        StepSpec("commit_stock", "inventory", "commit", depends_on=("dispatch_shipment",), retry=FOREVER_ISH),
        StepSpec("mark_shipped", "orders", "ship", depends_on=("dispatch_shipment",), retry=FOREVER_ISH),
        StepSpec(
            "notify_customer",
            "notifications",
            "send_confirmation",
            depends_on=("dispatch_shipment",),
            inputs=("order_id", "customer_email", "shipping_address"),
            retry=RetryPolicy(max_attempts=10, max_interval=60.0),
        ),
    )


# What an order's refusals say (the codes are in orchestration/rules.py).
ORDER_REFUSALS = {
    "already_cancelled": "This order is already cancelled",
    "not_cancellable": "This order can no longer be cancelled (it is {state})",
    "already_shipped": "The order has shipped; it can no longer be cancelled",
    "shipment_in_progress": "The parcel is leaving the warehouse right now; it can no longer be cancelled",
}

# After the pivot a step must eventually succeed; past this policy the saga is parked.
FOREVER_ISH = RetryPolicy(max_attempts=30, max_interval=60.0)

ON_ORDER_FAILURE = (
    StepSpec("reject_order", "orders", "reject", retry=RetryPolicy(max_attempts=20, max_interval=60.0)),
    StepSpec(
        "notify_failure",
        "notifications",
        "send_failure",
        depends_on=("reject_order",),
        inputs=("order_id", "customer_email", "shipping_address"),
        retry=RetryPolicy(max_attempts=20, max_interval=60.0),
    ),
)

ORDER_MESSAGES = {
    "cancelled": "Cancelled at the customer's request",
    "deadline_exceeded": "The order took too long to complete",
    "cancel_refused": "the parcel had left",
}

PLACE_ORDER = SagaDefinition(
    name="place_order",
    description="Reserve stock, then take payment; approve, book and dispatch; commit stock, mark shipped, tell the customer.",
    steps=_order_steps(parallel=False),
    on_failure=ON_ORDER_FAILURE,
    messages=ORDER_MESSAGES,
    refusals=ORDER_REFUSALS,
)

PLACE_ORDER_PARALLEL = SagaDefinition(
    name="place_order_parallel",
    description="As place_order, with stock reservation and payment side by side.",
    steps=_order_steps(parallel=True),
    on_failure=ON_ORDER_FAILURE,
    messages=ORDER_MESSAGES,
    refusals=ORDER_REFUSALS,
)

PLACE_ORDER_TCC = SagaDefinition(
    name="place_order_tcc",
    style="tcc",
    description="Hold stock, authorise the card, book tentatively and check the order, all at once; "
    "then confirm all (commit, capture, confirm, approve) or cancel all (release, void, cancel).",
    steps=(
        StepSpec("reserve_stock", "inventory", "reserve", "release", confirm="commit", inputs=("order_id", "items")),
        StepSpec(
            "charge_payment",
            "payments",
            "authorize",
            "void",
            confirm="capture",
            inputs=("order_id", "amount", "currency", "payment_method"),
        ),
        StepSpec(
            "schedule_shipment",
            "shipping",
            "book_tentative",
            "cancel",
            confirm="confirm_booking",
            inputs=("order_id", "shipping_address"),
        ),
        StepSpec("approve_order", "orders", "check_pending", "release_check", confirm="approve"),
        StepSpec(
            "notify_customer",
            "notifications",
            "send_confirmation",
            depends_on=("reserve_stock", "charge_payment", "schedule_shipment", "approve_order"),
            inputs=("order_id", "customer_email", "shipping_address"),
            retry=RetryPolicy(max_attempts=10, max_interval=60.0),
        ),
    ),
    on_failure=ON_ORDER_FAILURE,
    outcome={"order": "approved", "shipment": "scheduled"},
    messages=ORDER_MESSAGES,
    refusals=ORDER_REFUSALS,
)


# The same flow with no coordinator: each service's `choreography.py` says what it reacts to.
# These steps are what the tracker rebuilds from the events (names, services, compensations),
# so a choreographed order looks like an orchestrated one; the engine never sends them.
PLACE_ORDER_CHOREOGRAPHY = SagaDefinition(
    name="place_order_choreography",
    style="choreography",
    description="The order flow with no coordinator: services react to each other's events.",
    steps=_order_steps(parallel=False),
    on_failure=ON_ORDER_FAILURE,
    messages=ORDER_MESSAGES,
    cancel_event=events.ORDER_CANCEL_REQUESTED,
    refusals=ORDER_REFUSALS,
    # The tracker cannot stop a dispatch the services are about to start: it refuses a cancel
    # this close to it.
    cancel_margin=1.0,
)

# The order's `mode` (chosen per order through the API) and the definition that runs it.
MODES = {
    "orchestrated": PLACE_ORDER,
    "parallel": PLACE_ORDER_PARALLEL,
    "tcc": PLACE_ORDER_TCC,
    "choreography": PLACE_ORDER_CHOREOGRAPHY,
}

if settings.SAGA_DEFINITIONS_MODULE:
    MODES = import_module(settings.SAGA_DEFINITIONS_MODULE).modes(dict(MODES))

DEFINITIONS: dict[str, SagaDefinition] = {d.name: d for d in MODES.values()}


def for_mode(mode: str) -> SagaDefinition:
    try:
        return MODES[mode]
    except KeyError:
        raise LookupError(f"no saga definition for mode {mode!r}") from None


def get_definition(name: str) -> SagaDefinition:
    try:
        return DEFINITIONS[name]
    except KeyError:
        raise LookupError(f"no saga definition named {name!r}") from None


class UnknownDefinitionVersion(LookupError, ApiError):
    """A saga names a definition version that is neither in the code nor among the snapshots.
    The engine fails on it (the sweeper parks the saga with an alert); an operator action on it
    is answered 409."""

    status = 409
    code = "unknown_definition_version"

    def __init__(self, message: str) -> None:
        ApiError.__init__(self, message)


# Snapshots this process has read (by digest; a snapshot never changes).
_LOADED: dict[str, SagaDefinition] = {}


def snapshot(definition: SagaDefinition) -> DefinitionSnapshot:
    """The row that keeps `definition` as it is now (`record`)."""
    from .models import DefinitionSnapshot

    return DefinitionSnapshot(
        digest=definition.digest, name=definition.name, version=definition.version, graph=definition._graph
    )


def record(definition: SagaDefinition, *, using: str = "default") -> None:
    """Keep a snapshot of `definition` (idempotent), in the caller's transaction: a saga that
    starts on it can load it for the rest of its life, whatever the code says by then. (On
    PostgreSQL the engine writes it in the statement that creates the saga, `create_saga`.)"""
    from .models import DefinitionSnapshot

    # INSERT ... ON CONFLICT DO NOTHING: one statement, and concurrent starts never collide.
    DefinitionSnapshot.objects.using(using).bulk_create([snapshot(definition)], ignore_conflicts=True)


def for_saga(saga) -> SagaDefinition:
    """The exact definition `saga` runs: the version it recorded at its start, for its whole
    life. The code's definition when its content is unchanged, else the stored snapshot (the
    step graph is data; the operations it names stay in the services' code). A saga from before
    versions (no digest) runs the code's definition of its name."""
    digest = getattr(saga, "definition_hash", "")
    if not digest:
        return get_definition(saga.definition)
    current = DEFINITIONS.get(saga.definition)
    if current is not None and current.digest == digest:
        return current
    if digest in _LOADED:
        return _LOADED[digest]
    from .models import DefinitionSnapshot

    row = DefinitionSnapshot.objects.using("default").filter(digest=digest).first()
    if row is None:
        raise UnknownDefinitionVersion(
            f"no saga definition version {saga.definition} {digest[:12]} (neither in the code nor stored)"
        )
    # Keyed by the digest it was stored under (a later code may add fields with defaults, which
    # would change a recomputed hash, not what the saga runs).
    definition = SagaDefinition.from_graph(row.graph)
    _LOADED[digest] = definition
    return definition


def for_context(context: dict) -> SagaDefinition:
    """The definition a saga's context names: `definition`, or else the order's `mode`."""
    if context.get("definition"):
        return get_definition(context["definition"])
    return for_mode(context.get("mode", "orchestrated"))
