"""The style registry: a transaction style is one class behind one small interface, registered
by name; a definition names its style (`SagaDefinition.style`) and the engine asks the registry.

Adding a style is one module under `styles/` that subclasses `Style` and calls `register`, and
one import of it in `orchestration/engine/__init__.py`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from sagaplatform.kernel import attempts

    from ..definitions import SagaDefinition, StepSpec
    from ..models import SagaStep
    from .run import JSON, QueueIdle, Run, SagaId


class Style:
    """What the engine asks of a transaction style. Every hook runs inside the engine's
    transaction, with the saga locked (`run`), except `start_cancelled`, which opens its own."""

    name: str = ""
    # The engine sends the steps' commands (False: the services start their own steps and the
    # engine only tracks what they report, so it neither starts due steps nor draws commands).
    coordinated: bool = True

    def label(self, definition: SagaDefinition) -> str:
        """What an operator sees and filters by (a style may tell apart shapes of its graph)."""
        return self.name

    def advance(self, run: Run) -> None:
        """Decide what comes next from the stored state (idempotent)."""
        raise NotImplementedError

    def lease_expired(
        self, run: Run, step: SagaStep, *, mark: attempts.Mark | None, known: bool, queue_idle: QueueIdle | None
    ) -> bool:
        """A step's lease has passed (the sweeper); return whether anything changed."""
        raise NotImplementedError

    def cancel(self, run: Run, failure: JSON) -> None:
        """Start cancelling a running saga the rules allowed (`rules.cancel_verdict`)."""
        raise NotImplementedError

    def start_cancelled(self, *, saga_id: SagaId, definition: SagaDefinition, context: JSON, failure: JSON) -> bool:
        """A cancel arrived before the saga exists. Return True if this created it cancelled;
        False if it exists now (created here or by the start) and the cancel is to be decided
        on it like any other."""
        raise NotImplementedError

    def retry_parked(self, run: Run, reason: str) -> None:
        """An operator resumes a parked saga."""
        raise NotImplementedError

    def retry_waiting(self, run: Run, steps: list[tuple[StepSpec, SagaStep]]) -> None:
        """An operator asks for the next attempt of these (spec, step) pairs waiting out a backoff now."""
        raise NotImplementedError

    def skipped(self, run: Run, step: SagaStep) -> None:
        """An operator settled this step's compensation by hand."""


_STYLES: dict[str, Style] = {}


def register(style: Style) -> Style:
    if style.name in _STYLES and type(_STYLES[style.name]) is not type(style):
        raise RuntimeError(f"style {style.name!r} registered twice")
    _STYLES[style.name] = style
    return style


def get(name: str) -> Style:
    try:
        return _STYLES[name]
    except KeyError:
        raise LookupError(f"no transaction style named {name!r}") from None


def of(definition: SagaDefinition) -> Style:
    return get(definition.style)


def names() -> list[str]:
    return list(_STYLES)
