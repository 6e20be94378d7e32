"""OpenTelemetry traces: one trace per order, across the web process, the outbox, the broker and
every service.

Off unless the standard environment asks for it (`OTEL_TRACES_EXPORTER`, or an
`OTEL_EXPORTER_OTLP_[TRACES_]ENDPOINT`); then nothing is instrumented and every hook here returns
at its first line. On, it instruments Django (the ASGI requests), Celery (a run span per task, the
context in the message headers, no publish spans: `RunSpans`) and, with
`SAGA_TRACE_DB_QUERIES=true`, psycopg (a span per
query: a saga runs some two hundred queries, which costs more than the rest of the tracing
together), and adds:

- the trace context is captured when a message is appended to the outbox (`capture`, stored
  with the row) and restored around its publication (`restored`), so a message published by the
  sweeper, or after a crash, still joins its order's trace;
- a span per step attempt, compensation and confirm, on the service that runs it (`step_span`),
  with the saga id, step, op, attempt and outcome as attributes; a retry is another span. It is
  the `run/<task>` span of the task that runs the attempt, renamed
  `<service> <op> <step>` (its `celery.task_name` attribute keeps the task), or a span of its own
  when the attempt runs outside a traced task.

A malformed `traceparent` (in a request or a message) is ignored: a new trace starts.

Exporters (`OTEL_TRACES_EXPORTER`): `otlp` (OTLP over HTTP, `OTEL_EXPORTER_OTLP_ENDPOINT`),
`console`, `file` (JSON lines appended to `SAGA_TRACE_FILE`; tests), `null` (spans made, then
dropped; the benchmark), `none` (off).
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading

logger = logging.getLogger(__name__)

ENABLED = False
_configured = False
_lock = threading.Lock()
_tracer = None

EXPORTERS = ("otlp", "console", "file", "null")


def wanted_exporter() -> str | None:
    """The exporter the environment asks for, or None when tracing is off."""
    if os.environ.get("OTEL_SDK_DISABLED", "").lower() == "true":
        return None
    name = os.environ.get("OTEL_TRACES_EXPORTER", "").strip().lower()
    if name in ("", "otlp_proto_http") and (
        os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT") or os.environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
    ):
        return "otlp"
    if name == "otlp_proto_http":
        return "otlp"
    return name if name in EXPORTERS else None


def configure(exporter: str | None = None) -> bool:
    """Set up the SDK and the instrumentations once per process, if the environment asks (or
    `exporter`, for a process that turns tracing on later: the benchmark)."""
    global ENABLED, _configured, _tracer
    with _lock:
        if ENABLED or (_configured and exporter is None):
            return ENABLED
        _configured = True
        if _tracer is not None:  # set up before, then switched off (the benchmark)
            ENABLED = True
            return True
        exporter_name = exporter or wanted_exporter()
        if exporter_name is None:
            return False
        from opentelemetry import trace
        from opentelemetry.instrumentation.celery import CeleryInstrumentor
        from opentelemetry.instrumentation.django import DjangoInstrumentor
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor, SimpleSpanProcessor

        from .exporters import FileSpanExporter, NullSpanExporter

        os.environ.setdefault("OTEL_SERVICE_NAME", "sagaplatform")
        provider = TracerProvider(resource=Resource.create())
        if exporter_name == "otlp":
            from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

            provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
        elif exporter_name == "console":
            from opentelemetry.sdk.trace.export import ConsoleSpanExporter

            provider.add_span_processor(BatchSpanProcessor(ConsoleSpanExporter()))
        elif exporter_name == "file":
            # Written as each span ends, so nothing is lost when a pool child is recycled.
            provider.add_span_processor(SimpleSpanProcessor(FileSpanExporter(os.environ["SAGA_TRACE_FILE"])))
        else:
            provider.add_span_processor(BatchSpanProcessor(NullSpanExporter()))
        trace.set_tracer_provider(provider)
        if not os.environ.get("OTEL_PROPAGATORS"):
            # The W3C trace context only (the SDK's default adds baggage, which nothing here uses:
            # an extract and an inject more per message, for every publish, run and outbox row).
            from opentelemetry.propagate import set_global_textmap
            from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

            set_global_textmap(TraceContextTextMapPropagator())
        _tracer = trace.get_tracer("sagaplatform")
        DjangoInstrumentor().instrument(tracer_provider=provider)
        if os.environ.get("SAGA_TRACE_PUBLISH_SPANS", "").lower() == "true":
            CeleryInstrumentor().instrument(tracer_provider=provider)
        else:
            RunSpans(_tracer).connect()
        if os.environ.get("SAGA_TRACE_DB_QUERIES", "").lower() == "true":  # a span per query: costly
            from opentelemetry.instrumentation.psycopg import PsycopgInstrumentor

            PsycopgInstrumentor().instrument(tracer_provider=provider, skip_dep_check=True)
        ENABLED = True
        return True


class RunSpans:
    """A `run/<task>` span (kind consumer) per Celery task run, the child of the context its
    message's headers carry, with the task's name, message id and final state; an exception
    recorded on it. What the Celery instrumentation's run spans give without its per-run cost:
    it copies some fifteen request fields onto every span twice, starts each span through two
    context attachments and times every task for an OpenTelemetry meter nothing reads.

    No publish span: a message's headers get the current trace context (`_inject_context`: the
    span that wrote its outbox row, restored around the publication), so the run span's parent
    is the span that sent the message. A publish span per message was about half the spans of an
    order and said nothing the outbox row and the run span do not.
    `SAGA_TRACE_PUBLISH_SPANS=true` uses the Celery instrumentation instead, publish spans and
    all."""

    def __init__(self, tracer) -> None:
        from opentelemetry import context, trace
        from opentelemetry.propagate import extract, get_global_textmap
        from opentelemetry.trace import Status, StatusCode

        self.tracer = tracer
        self.fields = tuple(get_global_textmap().fields)  # the header names the propagator reads
        self.open: dict[str, tuple] = {}  # task id -> (span, context token)
        self._context, self._trace, self._extract = context, trace, extract
        self._error = lambda description: Status(StatusCode.ERROR, description)

    def connect(self) -> None:
        from celery import signals

        signals.task_prerun.connect(self.prerun, weak=False)
        signals.task_postrun.connect(self.postrun, weak=False)
        signals.task_failure.connect(self.failure, weak=False)
        signals.before_task_publish.connect(_inject_context, weak=False)

    def disconnect(self) -> None:
        from celery import signals

        signals.task_prerun.disconnect(self.prerun)
        signals.task_postrun.disconnect(self.postrun)
        signals.task_failure.disconnect(self.failure)
        signals.before_task_publish.disconnect(_inject_context)

    def prerun(self, *args, task_id=None, task=None, **kwargs) -> None:
        if task is None or task_id is None:
            return
        request = task.request
        carrier = {field: value for field in self.fields if isinstance(value := getattr(request, field, None), str)}
        parent = self._extract(carrier) if carrier else None
        span = self.tracer.start_span(
            f"run/{task.name}",
            context=parent,
            kind=self._trace.SpanKind.CONSUMER,
            attributes={"celery.action": "run", "celery.task_name": task.name, "messaging.message.id": task_id},
        )
        self.open[task_id] = (span, self._context.attach(self._trace.set_span_in_context(span, parent)))

    def postrun(self, *args, task_id=None, state=None, **kwargs) -> None:
        entry = self.open.pop(task_id, None) if task_id is not None else None
        if entry is None:
            return
        span, token = entry
        if state:
            span.set_attribute("celery.state", state)
        span.end()
        self._context.detach(token)

    def failure(self, *args, task_id=None, exception=None, **kwargs) -> None:
        entry = self.open.get(task_id) if task_id is not None else None
        if entry is None or exception is None:
            return
        span = entry[0]
        span.record_exception(exception)
        span.set_status(self._error(f"{type(exception).__name__}: {exception}"))


def _inject_context(*args, headers: dict | None = None, **kwargs) -> None:
    from opentelemetry.propagate import inject

    if headers is not None:
        inject(headers)


# --- The outbox ------------------------------------------------------------------------------


def capture() -> dict | None:
    """The current trace context as W3C headers, to store with an outbox row (None when off or
    outside any span)."""
    if not ENABLED:
        return None
    from opentelemetry.propagate import inject

    carrier: dict = {}
    inject(carrier)
    return carrier or None


@contextlib.contextmanager
def restored(carrier):
    """Make a stored trace context current (a message being published by the relay joins the
    trace of the transaction that wrote it). Anything malformed is ignored."""
    if not ENABLED or not isinstance(carrier, dict) or not carrier:
        yield
        return
    from opentelemetry import context
    from opentelemetry.propagate import extract

    try:
        token = context.attach(extract({str(k): str(v) for k, v in carrier.items()}))
    except Exception:  # never let a bad context fail a publication
        yield
        return
    try:
        yield
    finally:
        context.detach(token)


# --- Steps -------------------------------------------------------------------------------------


@contextlib.contextmanager
def step_span(service: str, command, *, reaction: str = ""):
    """A span for one step attempt (an action, a compensation or a confirm) on its service. The
    caller reports the outcome with `outcome(span, status)`."""
    if not ENABLED or _tracer is None:  # configure() sets _tracer before ENABLED
        yield None
        return
    attributes = {
        "saga.id": str(command.saga_id),
        "saga.step": command.step,
        "saga.op": command.op,
        "saga.attempt": int(command.attempt),
        "saga.service": service,
    }
    if reaction:
        attributes["saga.reaction"] = reaction
    name = f"{service} {command.op} {command.step}"
    from opentelemetry import trace

    current = trace.get_current_span()
    if _adoptable(current):
        # The Celery instrumentation's span of the task that runs this attempt (one attempt per
        # task): it becomes the attempt's span, rather than parenting one more span of the same
        # length (a span costs the worker some 60 us to make and end).
        current.update_name(name)
        current.set_attributes(attributes)
        yield current
        return
    with _tracer.start_as_current_span(name, attributes=attributes) as span:
        yield span


def _adoptable(span) -> bool:
    """A Celery task's run span, recording and not yet a step attempt's."""
    name = getattr(span, "name", None)
    return (
        isinstance(name, str)
        and name.startswith("run/")
        and span.is_recording()
        and "saga.step" not in (getattr(span, "attributes", None) or {})
    )


def outcome(span, status: str) -> None:
    if span is not None:
        span.set_attribute("saga.outcome", status)
        if status != "succeeded":
            from opentelemetry.trace import Status, StatusCode

            span.set_status(Status(StatusCode.ERROR, status))


def current_ids() -> tuple[str, str] | None:
    """(trace_id, span_id) of the current span, as hex, or None."""
    if not ENABLED:
        return None
    from opentelemetry import trace

    context = trace.get_current_span().get_span_context()
    if not context.is_valid:
        return None
    return format(context.trace_id, "032x"), format(context.span_id, "016x")


def current_trace_id() -> str | None:
    ids = current_ids()
    return ids[0] if ids else None


def trace_url(trace_id: str | None) -> str | None:
    from django.conf import settings

    template = getattr(settings, "SAGA_TRACE_URL_TEMPLATE", "")
    if not trace_id or not template:
        return None
    return template.replace("{trace_id}", trace_id)
