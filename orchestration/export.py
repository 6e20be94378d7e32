"""What an operator inspects and exports: a saga with each step's input (secrets masked),
result, error and attempt history, and its timeline (JSON); a filtered list of sagas (CSV)."""

from __future__ import annotations

import csv
import re
from collections.abc import Iterable, Iterator

from .definitions import get_definition
from .live import event_view, style_of
from .models import Saga, SagaEvent, SagaStep

DB = "default"
# Keys whose values are secrets: shown as their last four characters only.
SECRET_KEY = re.compile(r"token|secret|password|card|cvc|cvv|iban", re.IGNORECASE)
# The events that make a step's attempt history.
ATTEMPT_KINDS = {
    "step_started",
    "step_succeeded",
    "step_failed",
    "retry_scheduled",
    "step_timed_out",
    "compensation_started",
    "compensation_retry_scheduled",
    "step_compensated",
    "compensation_failed",
    "compensation_skipped",
    "confirm_started",
    "confirm_retry_scheduled",
    "step_confirmed",
    "confirm_failed",
    "operator_retry",
}


def mask(value):
    """A copy of `value` with every secret-looking key's value masked (at any depth)."""
    if isinstance(value, dict):
        return {k: (_masked(v) if SECRET_KEY.search(str(k)) else mask(v)) for k, v in value.items()}
    if isinstance(value, list):
        return [mask(v) for v in value]
    return value


def _masked(value) -> str | None:
    if value is None:
        return None
    text = str(value)
    return "••••" + text[-4:] if len(text) > 8 else "••••"


def step_input(saga: Saga, step: SagaStep) -> dict:
    """What the engine sends the service for this step (as engine._send builds it), masked."""
    try:
        spec = get_definition(saga.definition).step(step.name)
    except LookupError:  # a definition or step no longer declared
        return {}
    payload = {key: (saga.context or {}).get(key) for key in spec.inputs}
    if step.kind == SagaStep.Kind.ON_FAILURE:
        payload["failure"] = saga.failure
    return mask(payload)


def saga_export(saga: Saga) -> dict:
    steps = list(SagaStep.objects.using(DB).filter(saga=saga).order_by("kind", "position"))
    events = [event_view(e) for e in SagaEvent.objects.using(DB).filter(saga=saga).order_by("seq")]
    history: dict[str, list[dict]] = {}
    for event in events:
        if event["step"] and event["kind"] in ATTEMPT_KINDS:
            history.setdefault(event["step"], []).append(event)
    return {
        "saga": {
            "id": str(saga.id),
            "definition": saga.definition,
            "style": _style(saga.definition),
            "order_id": (saga.context or {}).get("order_id"),
            "state": saga.state,
            "version": saga.version,
            "failure": saga.failure,
            "context": mask(saga.context),
            "created_at": _iso(saga.created_at),
            "finished_at": _iso(saga.finished_at),
        },
        "steps": [
            {
                "name": s.name,
                "kind": s.kind,
                "service": s.service,
                "state": s.state,
                "attempts": s.attempts,
                "compensation_attempts": s.compensation_attempts,
                "confirm_attempts": s.confirm_attempts,
                "started_at": _iso(s.started_at),
                "finished_at": _iso(s.finished_at),
                "next_attempt_at": _iso(s.next_attempt_at),
                "input": step_input(saga, s),
                "result": mask(s.result),
                "error": mask(s.error),
                "history": history.get(s.name, []),
            }
            for s in steps
        ],
        "events": events,
    }


CSV_COLUMNS = [
    "id",
    "order_id",
    "definition",
    "style",
    "state",
    "failure_code",
    "failure_message",
    "customer_email",
    "skus",
    "amount",
    "currency",
    "version",
    "created_at",
    "finished_at",
]


class _Echo:
    def write(self, value):
        return value


def csv_rows(sagas: Iterable[Saga]) -> Iterator[str]:
    """The CSV text, one line at a time (for a streaming response)."""
    writer = csv.writer(_Echo())
    yield writer.writerow(CSV_COLUMNS)
    styles: dict[str, str] = {}
    for saga in sagas:
        context = saga.context or {}
        failure = saga.failure or {}
        if saga.definition not in styles:
            styles[saga.definition] = _style(saga.definition)
        yield writer.writerow(
            [
                saga.id,
                context.get("order_id", ""),
                saga.definition,
                styles[saga.definition],
                saga.state,
                failure.get("code", ""),
                _cell(failure.get("message", "")),
                _cell(context.get("customer_email", "")),
                " ".join(_cell(i.get("sku", "")) for i in context.get("items") or [] if isinstance(i, dict)),
                context.get("amount", ""),
                context.get("currency", ""),
                saga.version,
                _iso(saga.created_at),
                _iso(saga.finished_at) or "",
            ]
        )


def _style(name: str) -> str:
    try:
        return style_of(get_definition(name))
    except LookupError:
        return ""


def _cell(value) -> str:
    """Text a spreadsheet will not run as a formula (CSV injection)."""
    text = str(value or "")
    return "'" + text if text[:1] in ("=", "+", "-", "@", "\t", "\r") else text


def _iso(value) -> str | None:
    return value.isoformat() if value else None
