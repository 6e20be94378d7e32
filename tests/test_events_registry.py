"""The choreography's events are declared once (sagaplatform/kernel/events.py), and the flow is
whole: no service subscribes to an event no one publishes, and no event is published that no one
handles (except the ends of chains, which only the tracker records)."""

from __future__ import annotations

import importlib
import inspect

import pytest

from sagaplatform.kernel import choreography, events
from sagaplatform.kernel.choreography import Reaction
from sagaplatform.kernel.commands import ACTION


def test_the_services_reactions_make_a_whole_flow():
    assert choreography.reactions(), "the services' choreography modules are loaded"
    assert events.problems(choreography.reactions()) == []


def test_every_event_published_outside_a_reaction_is_published_by_its_module():
    constants = {value: name for name, value in vars(events).items() if name.isupper() and isinstance(value, str)}
    for event in events.EVENTS.values():
        if event.published_by:
            source = inspect.getsource(importlib.import_module(event.published_by))
            assert f"events.{constants[event.name]}" in source or f'"{event.name}"' in source, event


def rule(service: str, on: tuple[str, ...], emits: str | None, *, step: str = "s") -> Reaction:
    return Reaction(service=service, on=on, step=step, op=ACTION, operation="op", emits=emits)


DECLARED = {
    "a.started": events.Event("a.started", "", published_by="somewhere"),
    "a.done": events.Event("a.done", ""),
    "b.done": events.Event("b.done", "", final=True),
    "c.done": events.Event("c.done", ""),
}


def test_a_flow_whose_events_all_meet_has_no_problem():
    flow = [rule("a", ("a.started",), "a.done"), rule("b", ("a.done",), "b.done", step="t")]
    assert events.problems(flow, {k: v for k, v in DECLARED.items() if k != "c.done"}) == []


@pytest.mark.parametrize(
    ("flow", "problem"),
    [
        # b subscribes to c.done, which no reaction emits and no module publishes.
        (
            [rule("a", ("a.started",), "a.done"), rule("b", ("a.done", "c.done"), "b.done")],
            "c.done: subscribed to (b:s:action) but no one publishes it",
        ),
        # a publishes a.done and no one reacts to it (nor is it final).
        ([rule("a", ("a.started",), "a.done"), rule("c", ("a.started",), "c.done")], "a.done: published but"),
        # A name no one declared.
        ([rule("a", ("a.started",), "a.typo")], "a.typo: not declared"),
        # A final event that a service reacts to after all.
        (
            [rule("a", ("a.started",), "a.done"), rule("b", ("a.done",), "b.done"), rule("c", ("b.done",), None)],
            "b.done: declared final but a service reacts to it",
        ),
    ],
)
def test_a_broken_flow_is_named(flow, problem):
    found = events.problems(flow, DECLARED)
    assert any(p.startswith(problem) for p in found), found


def test_a_declared_event_nothing_uses_is_named():
    flow = [rule("a", ("a.started",), "a.done"), rule("b", ("a.done",), "b.done")]
    assert events.problems(flow, DECLARED) == ["c.done: declared but neither published nor subscribed to"]


def test_an_undeclared_name_is_refused_where_it_is_written():
    with pytest.raises(LookupError, match=r"undeclared choreography event 'stock\.reservd'"):
        choreography.event_message(event="stock.reservd", saga_id="x", context={})
    with pytest.raises(LookupError, match="undeclared"):
        choreography.reaction(service="nobody", on=("order.placd",), step="x", op=ACTION, operation="x", emits=None)
    assert not [r for r in choreography.reactions() if r.service == "nobody"]
