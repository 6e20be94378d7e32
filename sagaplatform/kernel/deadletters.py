"""Dead letters: a message no worker can run is recorded and acknowledged, and the worker goes on.

Two places can meet such a message:

- the Redis transport, which decodes each message's envelope inside the worker's event loop:
  there a body that is not JSON, not an envelope, or too big raised out of the loop and the
  worker exited ("Unrecoverable error"). `RedisTransport` checks the envelope first;
- Celery's consumer, which already acknowledges a message whose body it cannot decode, whose
  task it does not know or whose task is invalid, but records it only in a log line.
  `Consumer` records it too.

A dead letter lands in the database of the queue it came from (a service's own, `default` for
the orchestrator's), in the kernel's `DeadLetter` table; the orchestrator turns each into an alert
(`unalerted` / `mark_alerted`, read through the kernel as the audit reads per-database facts).
"""

from __future__ import annotations

import contextlib
import json
import logging
from collections.abc import Iterator
from queue import Empty
from typing import Any

from celery.worker.consumer import Consumer as CeleryConsumer
from django.conf import settings
from django.db import connections
from kombu.transport import redis as kombu_redis
from kombu.transport import virtual as kombu_virtual
from kombu.utils.encoding import bytes_to_str
from kombu.utils.json import loads

from .clock import db_now

logger = logging.getLogger(__name__)

# What a dead letter keeps of the message: enough to see what it was, not a copy of a huge body.
KEPT_BODY_CHARS = 4000
# DeadLetter.Reason, named here so that loading the transport does not import the models (the
# transport can be loaded before Django's apps are ready).
MALFORMED, OVERSIZED, UNDECODABLE, UNKNOWN_TASK, INVALID_TASK, FAILED = (
    "malformed",
    "oversized",
    "undecodable",
    "unknown_task",
    "invalid_task",
    "failed",
)


def alias_for(queue: str) -> str:
    return queue if queue in settings.SERVICE_ALIASES else "default"


def record(
    *,
    queue: str,
    reason: str,
    raw: object,
    task: str = "",
    message_id: str = "",
    error: str = "",
    size: int | None = None,
    in_task: bool = False,
) -> None:
    """Store one dead letter. Never raises: a worker must survive a database that is down too
    (the message is then only in the log line below)."""
    if isinstance(raw, bytes):
        text = raw[: KEPT_BODY_CHARS * 4].decode("utf-8", "backslashreplace")
    else:
        text = raw if isinstance(raw, str) else repr(raw)
    text = text[:KEPT_BODY_CHARS].replace("\x00", "\\x00")  # PostgreSQL text cannot hold NUL
    size = size if size is not None else len(raw) if isinstance(raw, bytes | str) else len(text)
    logger.error(
        "dead letter on queue %s: %s (task %r, %d bytes): %s",
        queue,
        reason,
        task,
        size,
        error,
        extra={"queue": queue, "reason": reason},
    )
    from .models import DeadLetter

    alias = alias_for(queue or "")
    try:
        DeadLetter.objects.using(alias).create(
            queue=(queue or "")[:64],
            reason=reason,
            task=(task or "")[:128],
            message_id=(message_id or "")[:64],
            size=size,
            body=text,
            error=(error or "")[:2000].replace("\x00", "\\x00"),
        )
    except Exception:
        logger.exception("could not record a dead letter on queue %s", queue)
    finally:
        # The worker's parent process (the event loop) does not otherwise use the database:
        # hold no connection there (a forked child would inherit it). A task (`in_task`) keeps
        # its connection, as any task does.
        if not in_task:
            connections[alias].close()


def _envelope_error(payload: object) -> str | None:
    """Why `payload` cannot be turned into a kombu message, or None."""
    if not isinstance(payload, dict):
        return f"expected a JSON object, got {type(payload).__name__}"
    properties = payload.get("properties")
    if not isinstance(properties, dict) or "delivery_tag" not in properties:
        return "no properties.delivery_tag"
    if not isinstance(payload.get("headers", {}), dict):
        return "headers is not an object"
    return None


class RedisQoS(kombu_redis.QoS):
    """kombu's Redis QoS, whose acknowledgements can go together: inside `together()` each
    `ack` adds its two commands (off the unacknowledged index and hash) to one pipeline, sent
    when the block ends, instead of a round trip each (a batch's messages, `batching`)."""

    _pipe: Any = None

    @contextlib.contextmanager
    def together(self) -> Iterator[None]:
        if self._pipe is not None:
            yield
            return
        with self.channel.conn_or_acquire() as client:
            pipe = self._pipe = client.pipeline()
            try:
                yield
            finally:
                self._pipe = None
                pipe.execute()  # lost (Redis down): the messages come back after the visibility timeout

    def ack(self, delivery_tag: Any) -> None:
        if self._pipe is None:
            super().ack(delivery_tag)
            return
        self._remove_from_indices(delivery_tag, self._pipe)
        kombu_virtual.QoS.ack(self, delivery_tag)  # the delivered-message bookkeeping kombu's ack does


class RedisChannel(kombu_redis.Channel):
    QoS = RedisQoS
    _sync_client: Any = None

    def _create_client(self, asynchronous: bool = False) -> Any:
        """kombu builds a new Redis client object for every publish and acknowledgement (about
        0.1 ms of CPU each, some thirty times per order); the client is thread-safe and its
        connections come from the channel's pool, so one per pool serves them all."""
        if asynchronous:
            return super()._create_client(asynchronous=True)
        client = self._sync_client
        if client is None or client.connection_pool is not self.pool:
            client = self._sync_client = super()._create_client()
        return client

    def _brpop_read(self, **options: Any) -> bool:
        """kombu 5.7's `_brpop_read`, with the item checked before it is delivered: a bad item
        was popped off the list already, so it is recorded here and the loop goes on (it never
        reached the unacknowledged set, so there is nothing left to acknowledge)."""
        try:
            try:
                dest__item = self.client.parse_response(self.client.connection, "BRPOP", **options)
            except self.connection_errors:
                self.client.connection.disconnect()
                raise
            if not dest__item:
                raise Empty()
            dest, item = dest__item
            dest = bytes_to_str(dest).rsplit(self.sep, 1)[0]
            self._queue_cycle.rotate(dest)
            payload = self._checked(dest, item)
            if payload is not None:
                self.connection._deliver(payload, dest)
            return True
        finally:
            self._in_poll = None  # type: ignore[assignment]  # as kombu's own _brpop_read does
            self._flush_brpop_reauth()

    def _checked(self, queue: str, item: bytes) -> Any:
        if len(item) > settings.SAGA_MAX_MESSAGE_BYTES:
            record(
                queue=queue,
                reason=OVERSIZED,
                raw=item[:KEPT_BODY_CHARS],
                size=len(item),
                error=f"{len(item)} bytes > SAGA_MAX_MESSAGE_BYTES={settings.SAGA_MAX_MESSAGE_BYTES}",
            )
            return None
        payload = None
        try:
            payload = loads(bytes_to_str(item))
            error = _envelope_error(payload)
            if error is None:
                properties = payload["properties"]
                if payload.get("body"):
                    self.decode_body(payload["body"], properties.get("body_encoding"))
        except Exception as exc:
            error = f"{type(exc).__name__}: {exc}"
        if error is None:
            return payload
        headers = payload.get("headers") if isinstance(payload, dict) else None
        headers = headers if isinstance(headers, dict) else {}
        record(
            queue=queue,
            reason=MALFORMED,
            raw=item,
            task=str(headers.get("task", "")),
            message_id=str(headers.get("id", "")),
            error=error,
        )
        return None


class RedisTransport(kombu_redis.Transport):
    """kombu's Redis transport with `RedisChannel` (settings: CELERY_BROKER_TRANSPORT)."""

    Channel = RedisChannel


def _headers(message: Any) -> dict[str, Any]:
    headers = getattr(message, "headers", None)
    return headers if isinstance(headers, dict) else {}


def _record_message(message: Any, reason: str, exc: BaseException | None) -> None:
    headers = _headers(message)
    delivery = getattr(message, "delivery_info", None) or {}
    record(
        queue=delivery.get("routing_key") or delivery.get("exchange") or "",
        reason=reason,
        raw=getattr(message, "body", b""),
        task=str(headers.get("task", "")),
        message_id=str(headers.get("id", "")),
        error="" if exc is None else f"{type(exc).__name__}: {exc}",
    )


class Consumer(CeleryConsumer):  # type: ignore[misc]  # celery has no types
    """Celery's consumer, recording what it rejects as dead letters (settings:
    CELERY_WORKER_CONSUMER). Celery still logs, acknowledges or rejects each as before."""

    def on_decode_error(self, message: Any, exc: BaseException) -> Any:
        _record_message(message, UNDECODABLE, exc)
        return super().on_decode_error(message, exc)

    def on_unknown_message(self, body: Any, message: Any) -> Any:
        _record_message(message, MALFORMED, None)
        return super().on_unknown_message(body, message)

    def on_unknown_task(self, body: Any, message: Any, exc: BaseException) -> Any:
        _record_message(message, UNKNOWN_TASK, exc)
        return super().on_unknown_task(body, message, exc)

    def on_invalid_task(self, body: Any, message: Any, exc: BaseException) -> Any:
        _record_message(message, INVALID_TASK, exc)
        return super().on_invalid_task(body, message, exc)


# An outage, not a bad message: the work comes back through a step's lease or the anti-entropy
# tasks once the database or the broker is back, so such a failure is no dead letter.
def _is_outage(exc: BaseException) -> bool:
    from billiard.exceptions import SoftTimeLimitExceeded, TimeLimitExceeded
    from django.db import DatabaseError, InterfaceError, OperationalError
    from kombu.exceptions import OperationalError as BrokerError

    return isinstance(
        exc,
        OperationalError | InterfaceError | BrokerError | SoftTimeLimitExceeded | TimeLimitExceeded | ConnectionError,
    ) or (isinstance(exc, DatabaseError) and "connection" in str(exc).lower())


def record_failed_task(
    sender: Any = None,
    task_id: str | None = None,
    exception: BaseException | None = None,
    args: Any = None,
    kwargs: Any = None,
    **_: Any,
) -> None:
    """`task_failure`: a task that raised is acknowledged, not retried
    (CELERY_TASK_ACKS_ON_FAILURE_OR_TIMEOUT), so its message is gone. If it raised because of what
    the message says (a command with no saga id, a reply for a saga whose definition is gone), it
    would fail the same way every time: record it. Periodic tasks carry no data and run again."""
    name = getattr(sender, "name", "") or ""
    periodic = {entry["task"] for entry in settings.CELERY_BEAT_SCHEDULE.values()}
    if name in periodic or exception is None or _is_outage(exception):
        return
    request = getattr(sender, "request", None)
    delivery = (getattr(request, "delivery_info", None) or {}) if request is not None else {}
    try:
        body = json.dumps([args or [], kwargs or {}], default=str)
    except (TypeError, ValueError):
        body = repr((args, kwargs))
    record(
        queue=delivery.get("routing_key") or "",
        reason=FAILED,
        raw=body,
        task=name,
        message_id=str(task_id or ""),
        error=f"{type(exception).__name__}: {exception}",
    )


# --- Read by the orchestrator, which raises an alert for each ------------------------------------


def unalerted(*, using: str, limit: int = 100) -> list[Any]:
    from .models import DeadLetter

    return list(DeadLetter.objects.using(using).filter(alerted_at__isnull=True).order_by("created_at")[:limit])


def mark_alerted(*, using: str, ids: list[int]) -> None:
    from .models import DeadLetter

    DeadLetter.objects.using(using).filter(id__in=ids, alerted_at__isnull=True).update(alerted_at=db_now(using))
