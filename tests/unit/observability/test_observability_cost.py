"""The cheaper observability paths (docs/OPERATIONS.md, "Cost") keep their meaning: a step
attempt's span is the Celery task's run span when there is one (one span fewer per attempt), its
own span otherwise; a message carries its sender's trace context without a publish span of its
own, and its run span is that sender's child; cached labelled metric children are the metric's
own."""

from __future__ import annotations

import uuid
from types import SimpleNamespace

import pytest
from opentelemetry import trace
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


def test_a_message_carries_its_senders_context_and_its_run_span_is_that_spans_child(spans):
    """`RunSpans`: no span for a publication, whose headers carry the sender's own span; the
    task's run is a consumer span named after it, the child of that sender, with the message id
    and final state, current while the task runs (so a step attempt can adopt it); a failure is
    recorded on it. Set up as a worker runs a task: the message's headers are its request's
    attributes, and the worker sends the signals."""
    from celery import Celery, signals

    app = Celery("run-spans-test", set_as_current=False)

    @app.task(name="inventory.execute")
    def execute():
        pass

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

    def run(headers: dict, *, fails: Exception | None = None) -> None:
        execute.push_request(id=headers["id"], **{k: v for k, v in headers.items() if k != "id"})
        try:
            signals.task_prerun.send(sender=execute, task_id=headers["id"], task=execute, args=(), kwargs={})
            assert tracing._adoptable(trace.get_current_span()), "the run span is current while the task runs"
            if fails is not None:
                signals.task_failure.send(sender=execute, task_id=headers["id"], exception=fails)
            state = "FAILURE" if fails else "SUCCESS"
            signals.task_postrun.send(sender=execute, task_id=headers["id"], task=execute, state=state)
        finally:
            execute.pop_request()

    run_spans = tracing.RunSpans(spans.tracer)
    run_spans.connect()
    try:
        headers, writer_id = publish()
        assert [s.name for s in spans.finished()] == ["writer"]
        assert headers["traceparent"].split("-")[2] == format(writer_id, "016x")

        run(headers)
        writer, ran = spans.finished()
        assert ran.name == "run/inventory.execute"
        assert ran.kind.name == "CONSUMER"
        assert ran.parent.span_id == writer_id
        assert ran.context.trace_id == writer.context.trace_id
        assert dict(ran.attributes) == {
            "celery.action": "run",
            "celery.task_name": "inventory.execute",
            "messaging.message.id": headers["id"],
            "celery.state": "SUCCESS",
        }
        assert ran.status.status_code.name == "UNSET"
        assert trace.get_current_span().get_span_context().is_valid is False
        assert run_spans.open == {}

        spans.clear()
        headers, _ = publish()
        run(headers, fails=RuntimeError("boom"))
        failed = spans.finished()[-1]
        assert failed.status.status_code.name == "ERROR"
        assert failed.status.description == "RuntimeError: boom"
        assert [e.name for e in failed.events] == ["exception"]

        spans.clear()
        run({"id": str(uuid.uuid4())})  # a message with no context starts a trace
        (alone,) = spans.finished()
        assert alone.parent is None
    finally:
        run_spans.disconnect()
