"""Batches: a worker takes many of a service's commands at once and runs them together.

Each service's `<service>.execute` task is a `CommandBatch` (and `orchestration.start_saga` a
`Batched`): the worker's consumer buffers the messages it receives and hands them to one pool
process as a list, once SAGA_BATCH_SIZE are buffered, or SAGA_BATCH_WAIT_MS after the first if
a pool process is free (while every process is busy, the buffer keeps filling), or at once when
the worker holds next to nothing else (a lone order's hops wait for no batch;
SAGA_BATCH_WAIT_WHEN_IDLE turns that off). `commands.execute_many` runs them in one
transaction and queues their replies with one INSERT; the replies are then applied in the same
process as one batch too (`engine.reply_handle_many`: one transaction, every saga locked and
decided on its own). The wire format is unchanged: a batch is only how a worker takes the
messages off the queue.

Acknowledgement is Celery's, per message: each is acknowledged once its batch has run (late
acknowledgement, as every task here). If the pool process dies during the batch, each message
gets Celery's own verdict for a lost worker (`Request.on_failure`: sent again, at most
`max_retries` times); past the hard time limit, each is acknowledged, as a single task's would
be. A message that cannot be read as a command is recorded as a dead letter on its own; the
rest of the batch runs.

This is the design of celery-batches (a strategy that buffers, a flush that hands the buffer
to the pool), written here because its releases cap Celery below the 5.7 this project runs,
and because a batch here needs Celery's per-message verdicts, which it does not give.
"""

from __future__ import annotations

import contextlib
import json
import logging
import threading
from collections.abc import Callable
from typing import Any

from celery import current_app, shared_task, signals
from celery._state import _task_stack
from celery.app.task import Context
from celery.app.trace import LOG_RECEIVED
from celery.utils.imports import symbol_by_name
from celery.worker.request import create_request_cls
from celery.worker.strategy import hybrid_to_proto2, proto1_to_proto2
from celery.worker.strategy import logger as received_logger
from django.conf import settings

from sagaplatform.celery import SagaTask
from sagaplatform.observability import metrics
from sagaplatform.observability.signals import ENQUEUED_HEADER

from . import commands, deadletters, outbox

logger = logging.getLogger(__name__)

# While every pool process is busy, a buffer due to be flushed looks again this often (a batch
# returning flushes it sooner).
BUSY_RECHECK = 0.05
# The trace context headers a message may carry (W3C trace context).
TRACE_HEADERS = ("traceparent", "tracestate")


def _item(request: Any) -> dict[str, Any]:
    """What a pool process needs of one message (picklable): its id, body, queue and the
    headers the run reads (trace context, when it became due)."""
    headers = request.request_dict or {}
    return {
        "id": request.id,
        "args": list(request.args),
        "kwargs": dict(request.kwargs or {}),
        "queue": (request.delivery_info or {}).get("routing_key") or "",
        "headers": {key: headers[key] for key in (*TRACE_HEADERS, ENQUEUED_HEADER) if key in headers},
    }


class Batched(SagaTask):
    """A task taken off the queue in batches (see the module's docstring): its `run` takes a
    list of messages (`_item`). A service's commands (`CommandBatch`) and the start messages
    (`orchestration.start_saga`) are."""

    abstract = True
    typing = False
    flush_every = settings.SAGA_BATCH_SIZE
    flush_interval = settings.SAGA_BATCH_WAIT_MS / 1000

    def __init__(self) -> None:
        self._buffer: list[Any] = []
        self._lock = threading.Lock()  # the threads pool's timer fires on a thread of its own
        self._pool: Any = None
        self._timer: Any = None
        self._armed = False  # a `_due` is scheduled

    def Strategy(self, task: Any, app: Any, consumer: Any) -> Callable[..., None]:
        """Buffer each message instead of running it (as celery-batches does); flush when the
        buffer is full, or `flush_interval` after its first message."""
        self._pool = consumer.pool
        request_class = create_request_cls(
            symbol_by_name(task.Request), task, consumer.pool, consumer.hostname, consumer.event_dispatcher, app=app
        )
        timer = self._timer = consumer.timer

        def task_message_handler(message: Any, body: Any, ack: Any, reject: Any, callbacks: Any, **kw: Any) -> None:
            if body is None and "args" not in message.payload:
                body, headers, decoded, utc = message.body, message.headers, False, app.uses_utc_timezone()
            elif "args" in message.payload:
                body, headers, decoded, utc = hybrid_to_proto2(message, message.payload)
            else:
                body, headers, decoded, utc = proto1_to_proto2(message, body)
            request = request_class(
                message,
                on_ack=ack,
                on_reject=reject,
                app=app,
                hostname=consumer.hostname,
                eventer=consumer.event_dispatcher,
                task=task,
                connection_errors=consumer.connection_errors,
                body=body,
                headers=headers,
                decoded=decoded,
                utc=utc,
            )
            if received_logger.isEnabledFor(logging.INFO):  # the line Celery logs for every message
                context = {
                    "id": request.id,
                    "name": request.name,
                    "args": request.argsrepr,
                    "kwargs": request.kwargsrepr,
                    "eta": None,
                }
                received_logger.info(LOG_RECEIVED, context, extra={"data": context})
            signals.task_received.send(sender=consumer, request=request)
            with _POOL_LOCK:
                _HELD[0] += 1
            if self._alone(request):
                # A command that calls outside the platform (a card gateway) runs in a batch of its
                # own: no other command waits behind the other side's answer.
                self._dispatch([request])
                return
            with self._lock:
                self._buffer.append(request)
                size = len(self._buffer)
            if size >= self.flush_every or _quiet():
                # Full, or the worker has next to nothing to do: no company worth waiting for.
                self.flush()
            elif not self._armed:
                self._armed = True
                timer.call_after(self.flush_interval, self._due)

        return task_message_handler

    def _alone(self, request: Any) -> bool:
        """Whether this message runs in a batch of its own, at once."""
        return False

    def _due(self) -> None:
        """The buffer's first message has waited `flush_interval`: flush, unless every pool
        process is busy with a batch already; then the buffer keeps filling and is flushed as
        soon as one returns (`_returned`). A batch handed to a busy pool would only wait in the
        pool's own queue, one message at a time: under load, the batches grow instead."""
        self._armed = False
        with _POOL_LOCK:
            busy = _IN_FLIGHT[0] >= (getattr(self._pool, "limit", None) or 1)
            if busy:
                _WAITING.setdefault(self.name, self)
        if not busy:
            self.flush()
        elif self._timer is not None and self._buffer:
            # And look again later, should no batch return (a pool process stuck in a hang).
            self._armed = True
            self._timer.call_after(BUSY_RECHECK, self._due)

    def flush(self) -> bool:
        """Hand the buffered messages to a pool process as one batch (False: none buffered).
        Each is acknowledged once the batch returns; a lost pool process or a time limit gets
        Celery's verdict for each."""
        with self._lock:
            requests, self._buffer = self._buffer, []
        if not requests:
            return False
        self._dispatch(requests)
        return True

    def _dispatch(self, requests: list[Any]) -> None:
        with _POOL_LOCK:
            _IN_FLIGHT[0] += 1

        def on_return(result: Any) -> None:
            with _acks_together(requests):
                for request in requests:
                    request.acknowledge()
            _returned(len(requests))

        def on_error(exc_info: Any) -> None:
            for request in requests:
                request.on_failure(exc_info)
            _returned(len(requests))

        def on_timeout(soft: bool, timeout: float) -> None:
            if not soft:
                for request in requests:
                    request.on_timeout(soft, timeout)

        try:
            self._apply(requests, on_return, on_error, on_timeout)
        except BaseException:
            _returned(len(requests))
            raise

    def _apply(self, requests: list[Any], on_return: Any, on_error: Any, on_timeout: Any) -> None:
        self._pool.apply_async(
            run_in_pool,
            (self.name, [_item(request) for request in requests]),
            callback=on_return,
            error_callback=on_error,
            timeout_callback=on_timeout,
            soft_timeout=self.soft_time_limit or self.app.conf.task_soft_time_limit,
            timeout=self.time_limit or self.app.conf.task_time_limit,
        )

    def deliver(self, payloads: list[dict[str, Any]]) -> None:
        """Run these messages' bodies as one batch in this process, as a direct call (tests,
        tools)."""
        self.run([_direct_item(payload) for payload in payloads])

    def apply(self, args: Any = None, kwargs: Any = None, *rest: Any, **options: Any) -> Any:
        """Run one message's body here, as Celery's `apply` runs a task (signals and all): a
        batch of one."""
        return super().apply(
            ([_direct_item(payload, options.get("task_id")) for payload in args or ()],), {}, *rest, **options
        )


class CommandBatch(Batched):
    """A service's command task (`command_task`)."""

    abstract = True

    def _alone(self, request: Any) -> bool:
        try:
            operation = request.args[0]["operation"]
        except Exception:  # unreadable: the batch records it as a dead letter
            return False
        return commands.calls_outside(self.name.rpartition(".")[0], operation)


def _direct_item(payload: dict[str, Any], message_id: str | None = None) -> dict[str, Any]:
    return {"id": message_id or "", "args": [payload], "kwargs": {}, "queue": "", "headers": {}}


# The consumer's batches handed to the pool and not yet returned, and the tasks whose buffer
# waits for a free pool process (one consumer per worker process).
_POOL_LOCK = threading.Lock()
_IN_FLIGHT = [0]
_WAITING: dict[str, Batched] = {}


def _acks_together(requests: list[Any]) -> contextlib.AbstractContextManager[None]:
    """Acknowledge a batch's messages in one broker round trip where the transport can (the
    Redis transport's `RedisQoS.together`); else each on its own."""
    qos = getattr(getattr(getattr(requests[0], "message", None), "channel", None), "qos", None)
    together = getattr(qos, "together", None) if len(requests) > 1 else None
    return together() if callable(together) else contextlib.nullcontext()


# The messages of batched tasks the consumer holds: buffered, or in a batch not yet returned.
_HELD = [0]


def _quiet() -> bool:
    """Whether the consumer holds no message but the one just received and at most one other
    (typically the one whose batch is finishing, and which sent this one on: its result reaches
    the consumer after the message it sent). Then no batch is worth waiting for, and the wait
    would only add to every hop of a lone order. Under load the consumer holds many, and the
    wait gathers them."""
    if settings.SAGA_BATCH_WAIT_WHEN_IDLE:
        return False
    with _POOL_LOCK:
        return _HELD[0] <= 2


def contexts_of(items: list[dict[str, Any]]) -> list[dict[str, Any] | None]:
    """Each message's trace context (W3C headers), or None."""
    return [
        {key: item["headers"][key] for key in TRACE_HEADERS if isinstance(item["headers"].get(key), str)} or None
        for item in items
    ]


def _returned(messages: int) -> None:
    """A batch of `messages` returned: if that frees a pool process (batches handed over past
    the limit, a gateway call's, may still be queued in the pool), it goes to the
    longest-waiting buffer."""
    with _POOL_LOCK:
        _IN_FLIGHT[0] -= 1
        _HELD[0] -= messages
    while True:  # the first waiting buffer that still holds messages
        with _POOL_LOCK:
            waiting = next(iter(_WAITING.values()), None)
            if waiting is None or _IN_FLIGHT[0] >= (getattr(waiting._pool, "limit", None) or 1):
                return
            del _WAITING[waiting.name]
        if waiting.flush():
            return


def run_in_pool(name: str, items: list[dict[str, Any]]) -> None:
    """A batch in a pool process, traced as Celery traces a task: the task's request (off the
    broker, so its replies may be applied here), and the prerun and postrun signals (database
    connections, logs, metrics, the run span)."""
    task = current_app.tasks[name]
    task_id = items[0]["id"]
    for item in items:
        queue = item["queue"] if item["queue"] in settings.SAGA_QUEUES else "other"
        metrics.queue_wait(queue, item["headers"].get(ENQUEUED_HEADER))
    _task_stack.push(task)
    task.request_stack.push(
        Context(id=task_id, called_directly=False, is_eager=False, delivery_info={"routing_key": items[0]["queue"]})
    )
    state = "SUCCESS"
    try:
        signals.task_prerun.send(sender=task, task_id=task_id, task=task, args=(items,), kwargs={})
        try:
            task(items)
        except Exception:
            state = "FAILURE"
            logger.exception("%s: a batch of %d failed", name, len(items))
    finally:
        try:
            signals.task_postrun.send(
                sender=task, task_id=task_id, task=task, args=(items,), kwargs={}, retval=None, state=state
            )
        finally:
            task.request_stack.pop()
            _task_stack.pop()


def command_task(service: str) -> Callable[..., None]:
    """`<service>.execute`: run a batch of commands on `service` (`commands.execute_many`); with
    SAGA_BATCH_SIZE = 1, a plain task running one command (`commands.execute`)."""
    if settings.SAGA_BATCH_SIZE <= 1:

        @shared_task(name=f"{service}.execute", ignore_result=True)
        def execute_one(message: dict[str, Any]) -> None:
            commands.execute(service=service, message=message)

        return execute_one  # type: ignore[no-any-return]

    @shared_task(name=f"{service}.execute", base=CommandBatch, bind=True, ignore_result=True)
    def execute(self: CommandBatch, items: list[dict[str, Any]]) -> None:
        run_batch(self, service, items)

    def run_inline(messages: list[Any]) -> list[bool]:
        """The engine's commands to `service`, run where they committed (`outbox.BATCH_RUNNERS`):
        for each, whether it ran. One that is not ready (`commands.ready_here`: a charge whose
        card's registration is still queued) goes through the queue instead, behind it."""
        parsed = [commands.Command.from_message(message.payload) for message in messages]
        here = [commands.ready_here(service, command) for command in parsed]
        if any(here):
            commands.execute_many(
                service=service,
                commands=[command for command, ok in zip(parsed, here, strict=True) if ok],
                contexts=[message.trace_context for message, ok in zip(messages, here, strict=True) if ok],
            )
        return here

    outbox.BATCH_RUNNERS[execute.name] = run_inline
    outbox.BATCH_ONLY.add(execute.name)
    # A saga's commands to several services in one round are parallel steps.
    outbox.FAN_OUT_KEYS[execute.name] = lambda message: message.payload.get("saga_id")
    outbox.RUN_MS[execute.name] = lambda message: commands.expected_ms(service, str(message.payload.get("operation")))
    return execute  # type: ignore[no-any-return]


def run_batch(task: Any, service: str, items: list[dict[str, Any]]) -> None:
    parsed: list[commands.Command] = []
    contexts: list[dict[str, Any] | None] = []
    for item, context in zip(items, contexts_of(items), strict=True):
        queue = item["queue"] or service
        try:
            parsed.append(commands.Command.from_message(item["args"][0]))
        except Exception as exc:  # what the message says is wrong: it would fail every time
            dead_letter(task, queue, item, exc)
            continue
        contexts.append(context)
    if parsed:
        commands.execute_many(service=service, commands=parsed, contexts=contexts)


def dead_letter(task: Any, queue: str, item: dict[str, Any], exc: Exception) -> None:
    logger.error("%s: unreadable command %s: %s", task.name, item["id"], exc)
    try:
        body = json.dumps([item["args"], item["kwargs"]], default=str)
    except (TypeError, ValueError):
        body = repr((item["args"], item["kwargs"]))
    deadletters.record(
        queue=queue,
        reason=deadletters.FAILED,
        raw=body,
        task=task.name,
        message_id=str(item["id"] or ""),
        error=f"{type(exc).__name__}: {exc}",
    )
