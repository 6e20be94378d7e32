"""Structured logs (structlog, through the standard library's logging).

Every line goes through one formatter: JSON lines in production (`LOG_FORMAT=json`, the default
with DJANGO_DEBUG off), readable key=value lines in the embedded mode. Lines from the standard
library's loggers (Django, Celery, the code's `logging.getLogger`) get the same fields: their
`extra={...}` become fields.

Context comes from structlog's contextvars: django-structlog binds the request id, the user id
and the Celery task id; `bind_task` (below) binds the saga id, order id, step, attempt and
service from the message a task handles; the engine's event hook binds the saga and order of the
saga it works on; `add_trace_ids` adds the current span's trace_id and span_id.

`redact` runs last before rendering: no payment token, password, card number or authorization
header reaches a log line, whatever a caller passes.
"""

from __future__ import annotations

import re

import structlog

SENSITIVE_KEYS = frozenset(
    {
        "payment_token",
        "token",
        "password",
        "password1",
        "password2",
        "new_password",
        "old_password",
        "card",
        "card_number",
        "cvc",
        "cvv",
        "authorization",
        "http_authorization",
        "secret",
        "api_key",
        "cookie",
        "sessionid",
        "csrfmiddlewaretoken",
    }
)
REDACTED = "[redacted]"
# Card-network test tokens (tok_...), API tokens in an Authorization header, and anything that
# looks like a card number (13 to 19 digits, optionally grouped).
_PATTERNS = (
    re.compile(r"\btok_[A-Za-z0-9_]+"),
    re.compile(r"(?i)\b(token|bearer|basic)\s+[A-Za-z0-9+/=._-]{8,}"),
    re.compile(r"(?<![\w-])(?:\d[ -]?){12,18}\d(?![\w-])"),  # not inside an id (a UUID's digits)
)
SAGA_KEYS = ("saga_id", "order_id", "step", "attempt", "service")


def _scrub(value):
    if isinstance(value, str):
        for pattern in _PATTERNS:
            value = pattern.sub(REDACTED, value)
        return value
    if isinstance(value, dict):
        return {k: (REDACTED if str(k).lower() in SENSITIVE_KEYS else _scrub(v)) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_scrub(v) for v in value]
    return value


def redact(logger, method_name, event_dict):
    for key in list(event_dict):
        if key.lower() in SENSITIVE_KEYS:
            event_dict[key] = REDACTED
        elif key not in ("timestamp", "level", "logger"):
            event_dict[key] = _scrub(event_dict[key])
    return event_dict


def add_trace_ids(logger, method_name, event_dict):
    from . import tracing

    ids = tracing.current_ids()
    if ids:
        event_dict.setdefault("trace_id", ids[0])
        event_dict.setdefault("span_id", ids[1])
    return event_dict


def _drop_internal(logger, method_name, event_dict):
    # Celery's own lines carry their arguments in `data`: never logged (they hold the context).
    data = event_dict.get("data")
    if isinstance(data, dict) and ("args" in data or "kwargs" in data):
        event_dict["data"] = {k: v for k, v in data.items() if k not in ("args", "kwargs")}
    return event_dict


def _shared_processors() -> list:
    return [
        structlog.contextvars.merge_contextvars,
        structlog.stdlib.add_log_level,
        structlog.stdlib.add_logger_name,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        add_trace_ids,
    ]


def formatter(json: bool) -> dict:
    """The `LOGGING` formatter for every handler."""
    renderer = (
        structlog.processors.JSONRenderer()
        if json
        else structlog.dev.ConsoleRenderer(colors=False, exception_formatter=structlog.dev.plain_traceback)
    )
    return {
        "()": structlog.stdlib.ProcessorFormatter,
        "foreign_pre_chain": [*_shared_processors(), structlog.stdlib.ExtraAdder()],
        "processors": [
            _drop_internal,
            structlog.processors.format_exc_info if json else (lambda _l, _m, e: e),
            redact,
            structlog.stdlib.ProcessorFormatter.remove_processors_meta,
            renderer,
        ],
    }


def configure_structlog() -> None:
    """structlog's own loggers (django-structlog's request and task lines) hand their events to
    the standard library's logging, which renders them with `formatter`."""
    structlog.configure(
        processors=[
            structlog.stdlib.filter_by_level,
            *_shared_processors(),
            structlog.stdlib.PositionalArgumentsFormatter(),
            structlog.processors.StackInfoRenderer(),
            structlog.processors.UnicodeDecoder(),
            structlog.stdlib.ProcessorFormatter.wrap_for_formatter,
        ],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.stdlib.BoundLogger,
        cache_logger_on_first_use=True,
    )


# --- Context ---------------------------------------------------------------------------------


def message_context(task_name: str, message) -> dict:
    """The saga fields of a message a task handles (a command, a reply, an event, a start)."""
    if not isinstance(message, dict):
        return {}
    prefix = task_name.split(".", 1)[0]
    fields = {"service": "orchestrator" if prefix == "orchestration" else prefix}
    if message.get("saga_id"):
        fields["saga_id"] = str(message["saga_id"])
    if message.get("step"):
        fields["step"] = str(message["step"])
    if message.get("attempt") is not None:
        fields["attempt"] = message["attempt"]
    for holder in (message.get("payload"), message.get("context"), message):
        if isinstance(holder, dict) and holder.get("order_id"):
            fields["order_id"] = str(holder["order_id"])
            break
    return fields


def bind_task(sender=None, task=None, **kwargs) -> None:
    """django-structlog's `bind_extra_task_metadata`: bind the message's saga fields."""
    args = getattr(task.request, "args", None) or ()
    fields = message_context(task.name, args[0] if args else None)
    if fields:
        structlog.contextvars.bind_contextvars(**fields)


def unbind_saga_fields(sender=None, context=None, **kwargs) -> None:
    """`modify_context_before_task_publish`: a published task gets its own saga fields from its
    message, never the publisher's."""
    for key in (*SAGA_KEYS, "trace_id", "span_id"):
        context.pop(key, None)


def bind_command(service: str, command) -> None:
    """A service runs a step command (also when no Celery signal ran: tests, tools)."""
    fields = {
        "saga_id": str(command.saga_id),
        "step": command.step,
        "attempt": command.attempt,
        "service": service,
    }
    order_id = (command.payload or {}).get("order_id")
    if order_id:
        fields["order_id"] = str(order_id)
    else:
        structlog.contextvars.unbind_contextvars("order_id")
    structlog.contextvars.bind_contextvars(**fields)


def bind_saga(saga, step=None) -> None:
    """The engine works on `saga` now (called from its event hook)."""
    fields = {"saga_id": str(saga.id), "service": "orchestrator"}
    order_id = (saga.context or {}).get("order_id")
    if order_id:
        fields["order_id"] = str(order_id)
    if step is not None:
        fields["step"] = step.name
    structlog.contextvars.bind_contextvars(**fields)
