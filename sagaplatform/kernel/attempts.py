"""Attempt marks: a service worker notes when it starts an attempt and when it has answered, so
that the sweeper can tell, once a step's lease expires, a command still waiting in a queue (or a
reply still waiting in the orchestrator's) from an attempt that ran out of time.

A mark is one Redis key per (saga, step, op, attempt), set with a fixed time to live when the
attempt starts and overwritten, keeping that time to live, when it has answered. How long ago
the attempt started is the time to live minus what is left of it: a duration on Redis's clock
alone, so no process's own clock is read. It costs the worker one Redis write at the start and
one at the end, and no extra message. In the embedded mode (one process, no Redis) the marks
live in the process's memory.

Marks are a hint: losing them (Redis restarted) only means the sweeper times the attempt out as
it did before marks existed.

Where a worker applies the replies itself (`outbox.inline_after` and the drain that follows it,
`answers_held`), the `answered` marks are not written on their own: they ride with this
thread's next breaker round trip (`breakers._send`, which the orchestrator makes when it applies
the reply that the mark is about, before that reply's commit), or, with no breaker round trip
(breakers off), are written at the end of the drain's round after the one that held them (the
round that applies their replies: `flush_held`).
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from functools import cache
from typing import Any

import redis
from django.conf import settings

logger = logging.getLogger(__name__)

STARTED = "started"
ANSWERED = "answered"
# Far longer than any queue wait, lease or retry the sweeper asks about.
TTL_MS = 3_600_000


@dataclass(frozen=True)
class Mark:
    state: str  # STARTED or ANSWERED
    age: float  # seconds since the attempt started


def key(saga_id: uuid.UUID | str, step: str, op: str, attempt: int) -> str:
    return f"saga:attempt:{saga_id}:{step}:{op}:{attempt}"


class _Memory:
    """The embedded mode's marks: one process, so its monotonic clock is the only clock."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.marks: dict[str, tuple[str, float]] = {}

    def write(self, mark_key: str, state: str) -> None:
        with self.lock:
            started = self.marks.get(mark_key, (None, time.monotonic()))[1]
            self.marks[mark_key] = (state, started)
            if len(self.marks) > 100_000:
                horizon = time.monotonic() - TTL_MS / 1000
                self.marks = {k: v for k, v in self.marks.items() if v[1] > horizon}

    def read(self, keys: list[str]) -> dict[str, Mark]:
        now = time.monotonic()
        with self.lock:
            found = {k: self.marks[k] for k in keys if k in self.marks}
        return {k: Mark(state, now - started) for k, (state, started) in found.items()}


@cache
def _store() -> _Memory | redis.Redis:
    cache_config = settings.CACHES["default"]
    if not cache_config["BACKEND"].endswith("RedisCache"):
        return _Memory()
    # Short timeouts: a mark is never worth holding up a command or a sweep for.
    return redis.Redis.from_url(cache_config["LOCATION"], socket_timeout=1, socket_connect_timeout=1)


def mark_started(mark_key: str) -> None:
    _write(mark_key, STARTED)


def mark_answered(mark_key: str) -> None:
    _write(mark_key, ANSWERED)


def mark_many_started(mark_keys: list[str]) -> None:
    _write_many(mark_keys, STARTED)


def mark_many_answered(mark_keys: list[str]) -> None:
    _write_many(mark_keys, ANSWERED)


def _write(mark_key: str, state: str) -> None:
    _write_many([mark_key], state)


_held = threading.local()


@contextlib.contextmanager
def answers_held() -> Iterator[None]:
    """Hold the `answered` marks written inside this block (see the module's docstring): they go
    with this thread's next breaker round trip (`queue_held`), or when the block ends."""
    if getattr(_held, "keys", None) is not None:
        yield
        return
    _held.keys = []
    try:
        yield
    finally:
        keys, _held.keys = _held.keys, None
        _write_many(keys, ANSWERED)


def queue_held(pipe: Any) -> list[str]:
    """Add the held `answered` marks to `pipe`, a Redis pipeline about to run, and take them out
    of the hold; returns their keys (their answers come first). If the pipeline fails, the
    caller gives them back (`hold_again`)."""
    keys: list[str] | None = getattr(_held, "keys", None)
    if not keys:
        return []
    _held.keys = []
    for mark_key in keys:
        _queue(pipe, mark_key, ANSWERED)
    return keys


def hold_again(keys: list[str]) -> None:
    """Marks taken by `queue_held` whose pipeline failed: held again (written when the block
    ends), or, outside a hold, written now."""
    held = getattr(_held, "keys", None)
    if held is not None:
        held[:0] = keys
    else:
        _write_many(keys, ANSWERED)


def held_now() -> list[str]:
    """The marks held at this moment (see `flush_held`)."""
    return list(getattr(_held, "keys", None) or ())


def flush_held(keys: list[str]) -> None:
    """Write now the held marks among `keys`: held through a whole round of the drain, which no
    breaker round trip took (breakers off)."""
    held = getattr(_held, "keys", None)
    if not held:
        return
    wanted = set(keys)
    due = [k for k in held if k in wanted]
    if due:
        _held.keys = [k for k in held if k not in wanted]
        _write_many(due, ANSWERED, held=False)


def _queue(pipe: Any, mark_key: str, state: str) -> None:
    if state == STARTED:
        pipe.set(mark_key, state, px=TTL_MS)
    else:  # keep the time to live set at the start: it is the start time
        pipe.set(mark_key, state, xx=True, keepttl=True)


def _write_many(mark_keys: list[str], state: str, *, held: bool = True) -> None:
    """Write marks: a batch's in one Redis round trip (`answered` ones held inside
    `answers_held`, unless `held` is false)."""
    if not mark_keys:
        return
    store = _store()
    try:
        if isinstance(store, _Memory):
            for mark_key in mark_keys:
                store.write(mark_key, state)
            return
        holding = getattr(_held, "keys", None) if held else None
        if holding is not None and state == ANSWERED:
            holding.extend(mark_keys)
            return
        pipe = store.pipeline(transaction=False)
        for mark_key in mark_keys:
            _queue(pipe, mark_key, state)
        pipe.execute()
    except Exception:
        logger.warning("attempt marks %s not written", ", ".join(mark_keys), exc_info=True)


def read(keys: list[str]) -> dict[str, Mark] | None:
    """The marks found among `keys`; None when they cannot be read (then nothing is known)."""
    store = _store()
    if isinstance(store, _Memory):
        return store.read(keys)
    try:
        pipe = store.pipeline(transaction=False)
        for mark_key in keys:
            pipe.get(mark_key)
            pipe.pttl(mark_key)
        replies = pipe.execute()
    except Exception:
        logger.warning("attempt marks not readable", exc_info=True)
        return None
    marks = {}
    for mark_key, state, ttl in zip(keys, replies[::2], replies[1::2], strict=True):
        if state is not None and ttl >= 0:
            marks[mark_key] = Mark(state.decode(), (TTL_MS - ttl) / 1000)
    return marks
