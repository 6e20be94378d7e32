"""The engine knows no order: a saga from another domain, defined only here, runs through every
style with no change to the engine.

A trip booking: reserve a seat on a flight, book a hotel, charge the card, then issue the ticket
(the point of no return). Three participants take part (`flights`, `hotels`, `cards`), and the
traveller's desk (`trips`) closes a trip that failed. They exist only in this module: in-memory
effects behind the real sub-transaction barrier, with their barrier rows and outbox in the test's
`default` database, answering the engine's commands (orchestrated, parallel, TCC) or reacting to
each other's events (choreography) as the platform's services do.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from datetime import timedelta
from types import SimpleNamespace
from typing import Any

import pytest
from django.db import transaction
from django.utils import timezone

from orchestration import definitions, engine, live, sweeper
from orchestration.definitions import RetryPolicy, SagaDefinition, StepSpec
from orchestration.exceptions import OperationNotAllowed
from orchestration.models import Alert, Saga, SagaEvent, SagaStep
from sagaplatform.celery import app as celery_app
from sagaplatform.kernel import barrier, choreography, events, outbox
from sagaplatform.kernel.choreography import Reaction
from sagaplatform.kernel.commands import (
    ACTION,
    COMPENSATE,
    ORCHESTRATOR_QUEUE,
    REPLY_TASK,
    SUCCEEDED,
    TRANSIENT_ERROR,
    Command,
)
from sagaplatform.kernel.errors import BusinessError, TransientError

pytestmark = pytest.mark.django_db(transaction=True, databases="__all__")

DB = "default"  # where the test participants keep their barrier rows and outbox
QUICK = RetryPolicy(max_attempts=2, initial_interval=0.01, max_interval=0.01, jitter=False)
TRIP_INPUTS = ("trip_id", "traveller")


# --- The travel domain's definitions ------------------------------------------------------------


def trip_steps(*, parallel: bool) -> tuple[StepSpec, ...]:
    return (
        StepSpec("reserve_flight", "flights", "reserve", "release", inputs=TRIP_INPUTS, compensation_retry=QUICK),
        StepSpec(
            "book_hotel",
            "hotels",
            "book",
            "cancel_booking",
            depends_on=() if parallel else ("reserve_flight",),
            inputs=TRIP_INPUTS,
            compensation_retry=QUICK,
        ),
        StepSpec(
            "charge_card",
            "cards",
            "charge",
            "refund",
            depends_on=("reserve_flight", "book_hotel") if parallel else ("book_hotel",),
            inputs=(*TRIP_INPUTS, "card"),
            compensation_retry=QUICK,
        ),
        StepSpec("issue_ticket", "flights", "issue", depends_on=("charge_card",), pivot=True, retry=QUICK),
    )


CLOSE_TRIP = (StepSpec("close_trip", "trips", "close", inputs=TRIP_INPUTS),)
TRIP_WORDS: dict[str, Any] = {
    "messages": {"cancelled": "Cancelled by the traveller", "cancel_refused": "the ticket was issued"},
    # The refusal codes are the platform's (orchestration/rules.py); the words are the trip's.
    "refusals": {
        "already_cancelled": "This trip is already cancelled",
        "already_shipped": "The ticket is issued; the trip can no longer be cancelled",
        "shipment_in_progress": "The ticket is being issued right now; the trip can no longer be cancelled",
    },
}

BOOK_TRIP = SagaDefinition(
    name="book_trip", steps=trip_steps(parallel=False), on_failure=CLOSE_TRIP, outcome={}, **TRIP_WORDS
)
BOOK_TRIP_PARALLEL = SagaDefinition(
    name="book_trip_parallel", steps=trip_steps(parallel=True), on_failure=CLOSE_TRIP, outcome={}, **TRIP_WORDS
)
BOOK_TRIP_TCC = SagaDefinition(
    name="book_trip_tcc",
    style="tcc",
    steps=(
        StepSpec("reserve_flight", "flights", "reserve", "release", confirm="confirm_seat", inputs=TRIP_INPUTS),
        StepSpec("book_hotel", "hotels", "book", "cancel_booking", confirm="confirm_booking", inputs=TRIP_INPUTS),
        StepSpec(
            "charge_card",
            "cards",
            "authorize",
            "void",
            confirm="capture",
            inputs=(*TRIP_INPUTS, "card"),
            confirm_retry=QUICK,
        ),
        StepSpec("issue_ticket", "flights", "issue", depends_on=("reserve_flight", "book_hotel", "charge_card")),
    ),
    on_failure=CLOSE_TRIP,
    outcome={},
    **TRIP_WORDS,
)
BOOK_TRIP_CHOREOGRAPHY = SagaDefinition(
    name="book_trip_choreography",
    style="choreography",
    steps=trip_steps(parallel=False),
    on_failure=CLOSE_TRIP,
    outcome={},
    cancel_event="trip.cancel_requested",
    cancel_margin=1.0,  # the tracker cannot stop a ticket the flights desk is about to issue
    **TRIP_WORDS,
)
BY_STYLE = {
    "orchestrated": BOOK_TRIP,
    "parallel": BOOK_TRIP_PARALLEL,
    "tcc": BOOK_TRIP_TCC,
    "choreography": BOOK_TRIP_CHOREOGRAPHY,
}

# Who reacts to what when no one coordinates (the shape of each service's `choreography.py`).
REACTIONS = [
    Reaction(service="flights", on=("trip.requested",), step="reserve_flight", op=ACTION, operation="reserve",
         emits="flight.reserved", emits_on_failure="flight.failed"),
    Reaction(service="hotels", on=("flight.reserved",), step="book_hotel", op=ACTION, operation="book",
         emits="hotel.booked", emits_on_failure="hotel.failed"),
    Reaction(service="cards", on=("hotel.booked",), step="charge_card", op=ACTION, operation="charge",
         emits="card.charged", emits_on_failure="card.declined"),
    # The ticket is issued after a window in which the traveller may still cancel.
    Reaction(service="flights", on=("card.charged",), step="issue_ticket", op=ACTION, operation="issue",
         emits="ticket.issued", emits_on_failure="ticket.failed", start_after=5.0),
    # A cancellation holds the ticket first (refused once it is issued), then unwinds.
    Reaction(service="flights", on=("trip.cancel_requested",), step="issue_ticket", op=COMPENSATE,
         operation="hold_ticket", emits="ticket.held", emits_on_failure="trip.cancel_refused"),
    Reaction(service="cards", on=("ticket.held",), step="charge_card", op=COMPENSATE, operation="refund",
         emits="card.refunded"),
    Reaction(service="hotels", on=("card.refunded", "card.declined"), step="book_hotel", op=COMPENSATE,
         operation="cancel_booking", emits="hotel.cancelled"),
    Reaction(service="flights", on=("hotel.cancelled", "hotel.failed"), step="reserve_flight", op=COMPENSATE,
         operation="release", emits="flight.released"),
    Reaction(service="trips", on=("flight.released", "flight.failed"), step="close_trip", op=ACTION,
         operation="close", emits="trip.closed"),
]  # fmt: skip


# The trip's events (the shape of `sagaplatform/kernel/events.py`): name, meaning, and who
# publishes it outside a reaction or whether it ends a chain.
TRIP_EVENTS = [
    ("trip.requested", "A traveller asked for a trip.", {"published_by": "tests"}),
    ("flight.reserved", "A seat is held.", {}),
    ("flight.failed", "No seat.", {}),
    ("hotel.booked", "A room is booked.", {}),
    ("hotel.failed", "No room.", {}),
    ("card.charged", "The card is charged.", {}),
    ("card.declined", "The card was declined.", {}),
    ("ticket.issued", "The ticket is issued (the point of no return).", {"final": True}),
    ("ticket.failed", "The ticket could not be issued.", {"final": True}),
    ("trip.cancel_requested", "The traveller cancelled.", {"published_by": "tests"}),
    ("ticket.held", "The ticket is held for a cancellation.", {}),
    ("trip.cancel_refused", "The ticket was issued: too late to cancel.", {"final": True}),
    ("card.refunded", "The card is refunded.", {}),
    ("hotel.cancelled", "The room is cancelled.", {}),
    ("flight.released", "The seat is released.", {}),
    ("trip.closed", "The trip is closed.", {"final": True}),
]


# --- The test-only participants ---------------------------------------------------------------


@dataclass
class Desk:
    """One participant: what it holds per trip, and the operations it is told to fail."""

    name: str
    effects: dict = field(default_factory=dict)  # (saga_id, step) -> state
    failing: dict = field(default_factory=dict)  # operation -> "business" | "transient"
    silent: bool = False  # it hears nothing (its events are lost)

    def operation(self, name: str):
        def run(*, command: Command) -> dict:
            mode = self.failing.get(name)
            if mode == "business":
                raise BusinessError(f"{self.name} refused {name}", code=f"{name}_refused")
            if mode == "transient":
                raise TransientError(f"{self.name} is unavailable")
            key = (str(command.saga_id), command.step)
            if name == "hold_ticket" and self.effects.get(key) == "issue":
                raise BusinessError("The ticket is already issued", code="ticket_issued")
            self.effects[key] = name
            return {"done": name}

        return run


class Participants:
    def __init__(self) -> None:
        self.desks = {name: Desk(name) for name in ("flights", "hotels", "cards", "trips")}

    def __getitem__(self, name: str) -> Desk:
        return self.desks[name]

    def effect(self, saga_id, step: str) -> str | None:
        service = BOOK_TRIP.step(step).service
        return self.desks[service].effects.get((str(saga_id), step))

    def execute(self, service: str, message: dict) -> None:
        """A command from the engine: run it through the barrier, answer through the outbox."""
        command = Command.from_message(message)
        try:
            with transaction.atomic(using=DB):
                outcome = barrier.call(using=DB, command=command, fn=self.desks[service].operation(command.operation))
                self._reply(command, outcome)
        except TransientError as error:
            with transaction.atomic(using=DB):
                self._reply(command, {"status": TRANSIENT_ERROR, "error": error.as_dict()})

    @staticmethod
    def _reply(command: Command, outcome: dict) -> None:
        reply = {"saga_id": str(command.saga_id), "step": command.step, "op": command.op, "attempt": command.attempt}
        outbox.enqueue(using=DB, task=REPLY_TASK, queue=ORCHESTRATOR_QUEUE, payload={**reply, **outcome})

    def react(self, service: str, message: dict) -> None:
        """An event it subscribes to: run the reaction, publish what it led to."""
        desk = self.desks[service]
        if desk.silent:
            return
        rule = next(r for r in choreography.reactions() if r.service == service and r.key == message["reaction"])
        command = Command(
            saga_id=uuid.UUID(message["saga_id"]),
            step=rule.step,
            op=rule.op,
            operation=rule.operation,
            attempt=int(message.get("attempt", 1)),
            payload=message["context"],
        )
        with transaction.atomic(using=DB):
            outcome = barrier.call(using=DB, command=command, fn=desk.operation(rule.operation))
            emitter = {"service": service, "step": rule.step, "op": rule.op, "status": outcome["status"]}
            emitter["null_compensation"] = outcome.get("barrier") == "null_compensation"
            if (outcome.get("error") or {}).get("code") == barrier.REFUSED_AFTER_COMPENSATION_CODE:
                # Overtaken by its compensation: nothing follows from it; only the tracker is told
                # (a note, not an event of the flow).
                news = {
                    "event": f"{rule.step}.refused",
                    "event_id": str(uuid.uuid4()),
                    "saga_id": message["saga_id"],
                    "context": message["context"],
                    "failure": message.get("failure"),
                    "emitter": {**emitter, "status": "refused"},
                }
                outbox.enqueue(using=DB, task=choreography.TRACK_TASK, queue=choreography.TRACK_QUEUE, payload=news)
                return
            if outcome.get("replayed") and not message.get("nudge"):
                return
            failure = message.get("failure")
            if outcome["status"] == SUCCEEDED:
                event = rule.emits
            else:
                event = rule.emits_on_failure
                failure = {**outcome["error"], "step": rule.step}
                emitter["definitive"] = True
            assert event, f"{rule.key}: every reaction of the trip publishes its outcome"
            choreography.publish(
                using=DB,
                message=choreography.event_message(
                    event=event,
                    saga_id=message["saga_id"],
                    context=message["context"],
                    failure=failure,
                    emitter=emitter,
                ),
            )


@pytest.fixture
def travel(monkeypatch, broker):
    """The travel domain, for this test only: its definitions, participants and reactions."""
    for definition in BY_STYLE.values():
        monkeypatch.setitem(definitions.DEFINITIONS, definition.name, definition)
    monkeypatch.setattr(events, "EVENTS", dict(events.EVENTS))
    for name, meaning, kinds in TRIP_EVENTS:
        events.declare(name, meaning, **kinds)
    monkeypatch.setattr(choreography, "_REACTIONS", [*choreography.reactions(), *REACTIONS])
    participants = Participants()
    for service in participants.desks:
        for kind, handler in (("execute", participants.execute), ("react", participants.react)):
            task = SimpleNamespace(run=lambda message, service=service, handler=handler: handler(service, message))
            monkeypatch.setitem(celery_app.tasks, f"{service}.{kind}", task)
    return participants


def book(style: str) -> str:
    """Start a trip's saga in `style`; returns its id (nothing delivered yet)."""
    saga_id = str(uuid.uuid4())
    definition = BY_STYLE[style]
    context = {"trip_id": saga_id, "traveller": "ada@example.com", "card": "4242", "definition": definition.name}
    if definition.style == "choreography":  # the test, as the requester, publishes the first event
        with transaction.atomic(using=DB):
            event = choreography.event_message(event="trip.requested", saga_id=saga_id, context=context)
            choreography.publish(using=DB, message=event)
    else:
        engine.saga_start(saga_id=saga_id, definition=definition.name, context=context)
    return saga_id


def steps(saga_id) -> dict[str, str]:
    return dict(SagaStep.objects.filter(saga_id=saga_id).values_list("name", "state"))


def saga(saga_id) -> Saga:
    return Saga.objects.get(id=saga_id)


STYLES = list(BY_STYLE)
CONFIRMED = {"tcc": "confirmed"}


# --- The proof --------------------------------------------------------------------------------


def test_the_trips_events_make_a_whole_flow():
    declared = {name: events.Event(name, meaning, **kinds) for name, meaning, kinds in TRIP_EVENTS}
    assert events.problems(REACTIONS, declared) == []


@pytest.mark.parametrize("style", STYLES)
def test_a_trip_is_booked_in_every_style(travel, broker, style):
    saga_id = book(style)
    broker.deliver()

    assert saga(saga_id).state == "completed"
    done = CONFIRMED.get(style, "succeeded")
    assert steps(saga_id) == {
        "reserve_flight": done,
        "book_hotel": done,
        "charge_card": done,
        "issue_ticket": "succeeded",
        "close_trip": "pending",
    }
    assert travel.effect(saga_id, "issue_ticket") == "issue"
    assert live.style_of(BY_STYLE[style]) == style  # parallel: the shape of the graph


@pytest.mark.parametrize("style", STYLES)
def test_a_declined_card_undoes_the_flight_and_the_hotel_and_closes_the_trip(travel, broker, style):
    travel["cards"].failing[BY_STYLE[style].step("charge_card").action] = "business"
    saga_id = book(style)
    broker.deliver()

    trip = saga(saga_id)
    assert trip.state == "compensated"
    assert trip.failure["code"] in ("charge_refused", "authorize_refused")
    assert steps(saga_id)["reserve_flight"] == steps(saga_id)["book_hotel"] == "compensated"
    assert steps(saga_id)["charge_card"] == "failed"
    assert steps(saga_id)["close_trip"] == "succeeded"
    assert travel.effect(saga_id, "reserve_flight") == "release"
    assert travel.effect(saga_id, "book_hotel") == "cancel_booking"
    assert travel.effect(saga_id, "issue_ticket") is None


@pytest.mark.parametrize("style", STYLES)
def test_a_trip_cancelled_before_anything_ran_is_cancelled(travel, broker, style):
    saga_id = book(style)
    context = {"trip_id": saga_id, "definition": BY_STYLE[style].name}

    engine.saga_cancel(saga_id=saga_id, context=context, actor="user:ada", reason="")
    broker.deliver()

    trip = saga(saga_id)
    assert trip.state == "cancelled"
    assert trip.failure["message"] == "Cancelled by the traveller"  # the definition's words
    assert steps(saga_id)["close_trip"] == "succeeded"
    assert travel.effect(saga_id, "issue_ticket") is None
    assert travel.effect(saga_id, "charge_card") in (None, "refund", "void")


def test_a_cancel_that_arrives_before_the_saga_starts_it_cancelled(travel, broker):
    saga_id = str(uuid.uuid4())
    context = {"trip_id": saga_id, "traveller": "ada@example.com", "card": "4242", "definition": BOOK_TRIP.name}
    engine.saga_cancel(saga_id=saga_id, context=context, actor="user:ada")
    engine.saga_start(saga_id=saga_id, definition=BOOK_TRIP.name, context=context)  # late: does nothing
    broker.deliver()

    assert saga(saga_id).state == "cancelled"
    assert saga(saga_id).definition == BOOK_TRIP.name
    assert travel["flights"].effects == {}


@pytest.mark.parametrize("style", STYLES)
def test_a_booked_trip_cannot_be_cancelled(travel, broker, style):
    saga_id = book(style)
    broker.deliver()
    assert saga(saga_id).state == "completed"

    with pytest.raises(OperationNotAllowed) as refused:
        engine.saga_cancel(saga_id=saga_id, context={}, actor="user:ada")

    # Words the trip's definition leaves out are generic: no order in them.
    assert (refused.value.code, refused.value.message) == (
        "not_cancellable",
        "This saga can no longer be cancelled (it is completed)",
    )


@pytest.mark.parametrize("style", ["orchestrated", "parallel"])
def test_a_cancel_while_the_ticket_is_issued_is_refused_in_the_definitions_words(travel, broker, style):
    saga_id = book(style)
    queued: list[dict] = []
    while not queued:  # everything up to the ticket's command, which waits
        broker.deliver(skip=("flights.execute",))
        for message in broker.take("flights.execute"):
            if message["payload"]["step"] == "issue_ticket":
                queued.append(message)
            else:
                broker.run(message)
    assert steps(saga_id)["issue_ticket"] == "running"

    with pytest.raises(OperationNotAllowed) as refused:
        engine.saga_cancel(saga_id=saga_id, context={}, actor="user:ada")
    assert (refused.value.code, refused.value.message) == (
        "shipment_in_progress",
        "The ticket is being issued right now; the trip can no longer be cancelled",
    )

    for message in queued:
        broker.run(message)
    broker.deliver()
    with pytest.raises(OperationNotAllowed) as refused:
        engine.saga_cancel(saga_id=saga_id, context={}, actor="user:ada")
    assert refused.value.code == "not_cancellable"
    assert saga(saga_id).state == "completed"


def test_choreography_a_cancel_the_services_refuse_lets_the_trip_run_on(travel, broker):
    saga_id = book("choreography")
    while broker.queue:  # everything up to the ticket's window (its reaction waits in the outbox)
        broker.run(broker.queue.pop(0))
    assert steps(saga_id)["issue_ticket"] == "pending"
    broker.release_delayed()
    [issue] = broker.take("flights.react")
    broker.run(issue)  # the window passed and the ticket is issued; the tracker has not heard yet
    held_news = broker.take("orchestration.track_event")

    engine.saga_cancel(saga_id=saga_id, context={}, actor="user:ada")
    assert saga(saga_id).state == "compensating"
    broker.queue.extend(held_news)
    broker.deliver()

    trip = saga(saga_id)
    assert trip.state == "completed"
    refused = SagaEvent.objects.get(saga=trip, kind="saga_cancel_refused")
    assert refused.data["reason"] == "the ticket was issued"  # the definition's words


@pytest.mark.parametrize("style", ["orchestrated", "parallel"])
def test_a_compensation_that_keeps_failing_parks_the_trip_and_an_operator_retry_finishes_it(travel, broker, style):
    travel["cards"].failing["charge"] = "business"
    travel["hotels"].failing["cancel_booking"] = "transient"
    saga_id = book(style)
    broker.deliver()

    assert saga(saga_id).state == "parked"
    assert steps(saga_id)["book_hotel"] == "compensation_failed"
    assert Alert.objects.filter(saga_id=saga_id, resolved_at__isnull=True).count() == 1

    travel["hotels"].failing.clear()  # fixed
    engine.saga_retry(saga_id=saga_id, actor="user:op", reason="hotel desk back")
    broker.deliver()

    assert saga(saga_id).state == "compensated"
    assert travel.effect(saga_id, "book_hotel") == "cancel_booking"
    assert travel.effect(saga_id, "reserve_flight") == "release"
    assert not Alert.objects.filter(saga_id=saga_id, resolved_at__isnull=True).exists()


def test_tcc_a_confirm_that_keeps_failing_parks_the_trip_and_an_operator_retry_finishes_it(travel, broker):
    travel["cards"].failing["capture"] = "transient"
    saga_id = book("tcc")
    broker.deliver()

    assert saga(saga_id).state == "parked"
    assert steps(saga_id)["charge_card"] == "confirm_failed"

    travel["cards"].failing.clear()
    engine.saga_retry(saga_id=saga_id, actor="user:op", reason="card gateway back")
    broker.deliver()

    assert saga(saga_id).state == "completed"
    assert travel.effect(saga_id, "charge_card") == "capture"
    assert travel.effect(saga_id, "issue_ticket") == "issue"


def test_choreography_a_silent_participant_parks_the_trip_and_an_operator_retry_finishes_it(travel, broker):
    travel["hotels"].silent = True
    saga_id = book("choreography")
    for _ in range(5):
        broker.deliver()
        SagaStep.objects.filter(saga_id=saga_id, name="book_hotel").update(
            deadline_at=timezone.now() - timedelta(seconds=1)
        )
        sweeper.sweep_once()

    assert saga(saga_id).state == "parked"
    assert SagaEvent.objects.filter(saga_id=saga_id, kind="event_nudged", step="book_hotel").count() == 3

    travel["hotels"].silent = False
    engine.saga_retry(saga_id=saga_id, actor="user:op", reason="hotel desk back")
    broker.deliver()

    assert saga(saga_id).state == "completed"
    assert travel.effect(saga_id, "issue_ticket") == "issue"
