"""The one-line hooks the engine and the kernel call (keep each call site a single line)."""

from __future__ import annotations

from . import logging as saga_logging
from . import metrics, tracing
from .signals import message_headers

__all__ = ["message_headers", "saga_event", "trace_context"]


def saga_event(run, event, step=None) -> None:
    """Every timeline event the engine (or the choreography's tracker) records: its metrics,
    the log context, and the trace id on a saga's first event."""
    saga_logging.bind_saga(run.saga, step)
    metrics.saga_event(run, event, step)


def trace_context() -> dict | None:
    return tracing.capture()


class step_attempt:
    """One step attempt on its service: a span, and its handler time. `done(outcome)` reports
    the outcome (a span attribute)."""

    __slots__ = ("_span", "_span_cm", "_started", "command", "service")

    def __init__(self, service: str, command, *, reaction: str = "") -> None:
        self.service, self.command = service, command
        self._span_cm = tracing.step_span(service, command, reaction=reaction)

    def __enter__(self):
        import time

        self._started = time.perf_counter()
        saga_logging.bind_command(self.service, self.command)
        self._span = self._span_cm.__enter__()
        return self

    def done(self, outcome: dict) -> None:
        tracing.outcome(self._span, str(outcome.get("status", "")))

    def __exit__(self, *exc):
        metrics.handler_done(self.service, self.command.step, self.command.op, self._started)
        return self._span_cm.__exit__(*exc)


def barrier_hit(service: str, kind: str) -> None:
    metrics.barrier_hit(service, kind)


def lock_conflict(service: str, *, retried: bool = True) -> None:
    metrics.lock_conflict(service, retried=retried)


def lock_exhausted(service: str) -> None:
    metrics.lock_exhausted(service)


def alert_delivery(channel: str, *, ok: bool, final: bool) -> None:
    metrics.alert_delivery(channel, ok=ok, final=final)
