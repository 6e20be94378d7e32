"""Fault injection for tests, demos and simulations: failures, latency, hangs and crashes.

Rules come from the service database (`FaultRule`, set at run time through the API or
`manage.py faults`) and from the `SAGA_FAULTS` environment variable, for example

    SAGA_FAULTS="payments.charge:failure_rate=0.2,latency_ms=50;inventory.reserve:crash_point=after_commit"

With no rule, a hook costs one cached lookup. A crash is `SIGKILL` to the current process: no
`finally`, no rollback handler, no goodbye to the broker, exactly like the OOM killer.

The orchestrator is a target too, as `orchestrator` (its rules live in its database, `default`):
`orchestrator.<step>` at `after_commit` crashes after the commit that sends the step's command,
before its publish; `orchestrator.relay` or `<service>.relay` at `before_commit` crashes an
outbox relay after its send, before the commit that marks the rows published.
"""

from __future__ import annotations

import logging
import os
import random
import signal
import threading
import time
from dataclasses import dataclass, fields
from typing import Any

from django.db import connections, transaction
from django.db.models import F

from .errors import TransientError
from .models import FaultRule

logger = logging.getLogger(__name__)

CACHE_SECONDS = 1.0
ORCHESTRATOR = "orchestrator"


def _alias(service: str) -> str:
    return "default" if service == ORCHESTRATOR else service


@dataclass(frozen=True)
class Rule:
    service: str
    operation: str = "*"
    failure_rate: float = 0.0
    fail_first: int = 0
    latency_ms: int = 0
    hang_seconds: float = 0.0
    crash_point: str = ""
    crashes_left: int = 1
    pk: int | None = None

    def matches(self, service: str, operation: str) -> bool:
        return self.service == service and self.operation in ("*", operation)


class InjectedFault(TransientError):
    code = "injected_fault"


def parse(spec: str) -> list[Rule]:
    """Parse `service.operation:key=value,key=value;...` (the SAGA_FAULTS format)."""
    rules = []
    types = {f.name: f.type for f in fields(Rule)}
    for chunk in filter(None, (part.strip() for part in spec.split(";"))):
        target, _, options = chunk.partition(":")
        service, _, operation = target.partition(".")
        values: dict[str, Any] = {"service": service, "operation": operation or "*"}
        for option in filter(None, options.split(",")):
            key, _, raw = option.partition("=")
            if key not in types or key in ("service", "operation", "pk"):
                raise ValueError(f"unknown fault option {key!r} in {chunk!r}")
            kind = types[key]
            values[key] = float(raw) if kind == "float" else int(raw) if kind == "int" else raw
        rules.append(Rule(**values))
    return rules


_ENV_RULES = parse(os.environ.get("SAGA_FAULTS", ""))
_cache: dict[str, tuple[float, list[Rule]]] = {}
_lock = threading.Lock()


def rules_for(service: str) -> list[Rule]:
    now = time.monotonic()
    with _lock:
        cached = _cache.get(service)
        if cached and now - cached[0] < CACHE_SECONDS:
            return cached[1]
    stored = [
        Rule(
            service=r.service,
            operation=r.operation,
            failure_rate=r.failure_rate,
            fail_first=r.fail_first,
            latency_ms=r.latency_ms,
            hang_seconds=r.hang_seconds,
            crash_point=r.crash_point,
            crashes_left=r.crashes_left,
            pk=r.pk,
        )
        for r in FaultRule.objects.using(_alias(service)).filter(service=service, is_enabled=True)
    ]
    found = [r for r in _ENV_RULES if r.service == service] + stored
    with _lock:
        _cache[service] = (now, found)
    return found


def clear_cache() -> None:
    with _lock:
        _cache.clear()


def before(service: str, operation: str, attempt: int) -> None:
    """Latency, hangs and transient failures, before the operation's work starts."""
    for rule in rules_for(service):
        if not rule.matches(service, operation):
            continue
        if rule.latency_ms:
            time.sleep(rule.latency_ms / 1000)
        if rule.hang_seconds:
            logger.warning("fault: %s.%s hangs %.1f s", service, operation, rule.hang_seconds)
            time.sleep(rule.hang_seconds)
        if attempt <= rule.fail_first:
            raise InjectedFault(
                f"Injected failure of {service}.{operation} (attempt {attempt} of the first {rule.fail_first})"
            )
        if rule.failure_rate and random.random() < rule.failure_rate:
            raise InjectedFault(f"Injected failure of {service}.{operation} (rate {rule.failure_rate:g})")


def fails_first(service: str, operation: str, attempt: int) -> bool:
    """Whether a `fail_first` rule fails this attempt, without applying any rule."""
    return any(r.matches(service, operation) and attempt <= r.fail_first for r in rules_for(service))


def crash_if(point: str, service: str, operation: str) -> None:
    for rule in rules_for(service):
        if rule.matches(service, operation) and rule.crash_point == point and _take_crash(rule):
            logger.error("fault: crashing at %s of %s.%s (pid %d)", point, service, operation, os.getpid())
            for handler in logging.getLogger().handlers:
                handler.flush()
            os.kill(os.getpid(), signal.SIGKILL)


def arm_after_commit(service: str, operation: str) -> None:
    """Register the after-commit crash before anything else registers its after-commit work
    (callbacks run in order), so the process dies between the commit and the publish."""
    if any(
        r.matches(service, operation) and r.crash_point == FaultRule.CrashPoint.AFTER_COMMIT for r in rules_for(service)
    ):
        transaction.on_commit(
            lambda: crash_if(FaultRule.CrashPoint.AFTER_COMMIT, service, operation), using=_alias(service)
        )


def crash_in_relay(using: str) -> None:
    """The relay of `using`'s outbox has sent its rows and not yet committed their marks."""
    crash_if(FaultRule.CrashPoint.BEFORE_COMMIT, ORCHESTRATOR if using == "default" else using, "relay")


def _take_crash(rule: Rule) -> bool:
    pk = rule.pk
    if pk is None:  # from the environment: crash every time it matches
        return True
    # Decrement on a connection of its own (a new thread gets one), committed before the crash:
    # inside the doomed transaction it would roll back, and the redelivered message would crash
    # the restarted worker again, forever.
    taken: list[int] = []

    def decrement() -> None:
        try:
            taken.append(
                FaultRule.objects.using(_alias(rule.service))
                .filter(pk=pk, crashes_left__gt=0)
                .update(crashes_left=F("crashes_left") - 1)
            )
        finally:
            connections.close_all()

    worker = threading.Thread(target=decrement)
    worker.start()
    worker.join()
    clear_cache()
    return taken == [1]
