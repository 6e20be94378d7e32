"""The cheaper observability paths (docs/OPERATIONS.md, "Cost") keep their meaning: a step
attempt's span is the Celery task's run span when there is one (one span fewer per attempt), its
own span otherwise; a message carries its sender's trace context without a publish span of its
own; cached labelled metric children are the metric's own."""

from __future__ import annotations

import uuid
from types import SimpleNamespace

import pytest
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from sagaplatform.observability import metrics, tracing


@pytest.fixture
def spans(monkeypatch):
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    tracer = provider.get_tracer("test")
    monkeypatch.setattr(tracing, "ENABLED", True)
    monkeypatch.setattr(tracing, "_tracer", tracer)
    return SimpleNamespace(tracer=tracer, finished=exporter.get_finished_spans, provider=provider, clear=exporter.clear)


def command(step: str = "reserve_stock", attempt: int = 1):
    return SimpleNamespace(saga_id=uuid.uuid4(), step=step, op="action", attempt=attempt)


def test_a_step_attempt_in_a_celery_task_is_its_run_span(spans):
    cmd = command(attempt=2)
    with (
        spans.tracer.start_as_current_span("run/inventory.execute") as run,
        tracing.step_span("inventory", cmd) as span,
    ):
        assert span is run
        tracing.outcome(span, "transient_error")
    (only,) = spans.finished()
    assert only.name == "inventory action reserve_stock"
    assert only.attributes["saga.id"] == str(cmd.saga_id)
    assert only.attributes["saga.attempt"] == 2
    assert only.attributes["saga.outcome"] == "transient_error"
    assert only.status.status_code.name == "ERROR"


def test_a_step_attempt_outside_a_task_span_gets_its_own_span(spans):
    with (
        spans.tracer.start_as_current_span("POST /api/orders/"),
        tracing.step_span("payments", command("charge_payment")) as span,
    ):
        tracing.outcome(span, "succeeded")
    names = [s.name for s in spans.finished()]
    assert names == ["payments action charge_payment", "POST /api/orders/"]
    assert spans.finished()[0].parent.span_id == spans.finished()[1].context.span_id


def test_a_second_attempt_in_the_same_task_gets_its_own_span(spans):
    with spans.tracer.start_as_current_span("run/orders.react"):
        with tracing.step_span("orders", command("approve_order"), reaction="a"):
            pass
        with tracing.step_span("orders", command("ship_order"), reaction="b"):
            pass
    by_name = {s.name: s for s in spans.finished()}
    assert set(by_name) == {"orders action approve_order", "orders action ship_order"}
    assert by_name["orders action ship_order"].parent.span_id == by_name["orders action approve_order"].context.span_id


def test_cached_metric_children_are_the_metrics_own(monkeypatch):
    monkeypatch.setattr(metrics, "ENABLED", True)
    child = metrics.child(metrics.BARRIER_HITS, "cost-test", "duplicate")
    assert child is metrics.BARRIER_HITS.labels("cost-test", "duplicate")
    assert metrics.child(metrics.BARRIER_HITS, "cost-test", "duplicate") is child
    before = child._value.get()
    metrics.barrier_hit("cost-test", "duplicate")
    assert metrics.BARRIER_HITS.labels("cost-test", "duplicate")._value.get() == before + 1


def test_a_message_carries_its_senders_context_without_a_publish_span(spans):
    """The Celery instrumentation alone makes an `apply_async/<task>` span per publication and
    puts its context in the headers; with the publish spans cut, the headers carry the sender's
    own span (the run span's parent), and no span is made for the publication."""
    from celery import signals
    from opentelemetry.instrumentation.celery import CeleryInstrumentor

    def publish() -> tuple[dict, int]:
        with spans.tracer.start_as_current_span("writer") as writer:
            headers = {"id": str(uuid.uuid4()), "task": "inventory.execute"}
            message: dict[str, object] = {
                "sender": "inventory.execute",
                "headers": headers,
                "body": ((), {}, {}),
                "routing_key": "inventory",
            }
            signals.before_task_publish.send(**message)
            signals.after_task_publish.send(**message)
        return headers, writer.get_span_context().span_id

    instrumentor = CeleryInstrumentor()
    instrumentor.instrument(tracer_provider=spans.provider)
    try:
        headers, _ = publish()
        assert [s.name for s in spans.finished()] == ["apply_async/inventory.execute", "writer"]
        spans.clear()

        tracing._without_publish_spans(instrumentor)
        headers, writer_id = publish()
        assert [s.name for s in spans.finished()] == ["writer"]
        assert headers["traceparent"].split("-")[2] == format(writer_id, "016x")
    finally:
        instrumentor.uninstrument()
        signals.before_task_publish.disconnect(tracing._inject_context)
