"""Circuit breakers: one per service (driven by the orchestrator from its steps' replies) and one
around the payment gateway (driven by the payments service), shared by every worker.

A breaker counts calls and transient failures in one-second buckets over a sliding window of
BREAKER_WINDOW seconds. Closed, it opens once the window holds at least BREAKER_MIN_CALLS calls
of which at least BREAKER_FAILURE_RATE failed. Open, it admits nothing for BREAKER_OPEN_SECONDS;
then it is half-open and admits at most BREAKER_HALF_OPEN_PROBES calls (a reservation every
worker shares, so many workers cannot all probe at once). The probes' outcomes decide: as many
successes close it, one failure opens it again; a round of probes with no verdict after another
open period (a prober died) is given up, and a fresh round admitted. Business failures (a declined card, no stock)
are successes here: the service answered.

State and counters live in Redis (the cache's server), each change one Lua script on the Redis
clock, so workers agree; in the embedded mode (one process, no Redis) in memory.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import random
import threading
import time
from collections import Counter, deque
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from functools import cache
from typing import TYPE_CHECKING, Any, cast

from django.conf import settings

from . import attempts

if TYPE_CHECKING:
    import redis

logger = logging.getLogger(__name__)

PREFIX = "breaker:"
INDEX = PREFIX + "index"
CLOSED, OPEN, HALF_OPEN = "closed", "open", "half_open"
GATEWAY = "payment_gateway"


@dataclass(frozen=True)
class Verdict:
    admitted: bool
    state: str
    retry_at: float = 0.0  # epoch seconds (Redis clock) when to ask again, if not admitted
    now: float = 0.0


def _config() -> list[Any]:
    return [
        settings.BREAKER_WINDOW,
        settings.BREAKER_MIN_CALLS,
        settings.BREAKER_FAILURE_RATE,
        settings.BREAKER_OPEN_SECONDS,
        settings.BREAKER_HALF_OPEN_PROBES,
        settings.BREAKER_PROBE_WAIT,
    ]


# Each transition is logged (the last LOG_LENGTH, newest first, "at|from|to|by") and counted per
# state entered (read at scrape time: the Prometheus transitions counter).
LOG_LENGTH = 20
_MOVED = """
local function moved(from, to, now, by)
  redis.call('LPUSH', KEYS[1] .. 'log', string.format('%.3f', now) .. '|' .. from .. '|' .. to .. '|' .. by)
  redis.call('LTRIM', KEYS[1] .. 'log', 0, LOG_LENGTH - 1)
  redis.call('HINCRBY', KEYS[1] .. 'transitions', to, 1)
end
""".replace("LOG_LENGTH", str(LOG_LENGTH))

# KEYS[1] = the breaker's prefix; ARGV = ok (1/0), window, min_calls, rate, open_s, probes, probe_wait
_RECORD = (
    _MOVED
    + """
local t = redis.call('TIME'); local now = tonumber(t[1]) + tonumber(t[2]) / 1e6
local sec = math.floor(now)
local ok = tonumber(ARGV[1]); local window = tonumber(ARGV[2])
local b = KEYS[1] .. 'w:' .. sec
redis.call('HINCRBY', b, 'calls', 1)
if ok == 0 then redis.call('HINCRBY', b, 'failures', 1) end
redis.call('EXPIRE', b, window + 5)
local s = KEYS[1] .. 'state'
local state = redis.call('HGET', s, 'state') or 'closed'
local was = state
if state == 'open' and ok == 0 and now >= tonumber(redis.call('HGET', s, 'until') or '0') then
  state = 'half_open'  -- the open period is over and the service still fails: as a failed probe
end
if state == 'half_open' then
  if ok == 1 then
    if redis.call('HINCRBY', s, 'probes_ok', 1) >= tonumber(ARGV[6]) then
      -- closed afresh: what happened before (the outage) no longer counts
      for i = sec - window, sec do redis.call('DEL', KEYS[1] .. 'w:' .. i) end
      redis.call('HSET', s, 'state', 'closed', 'changed_at', now, 'probes', 0, 'probes_ok', 0)
      moved('half_open', 'closed', now, 'probes_succeeded')
      return 'closed'
    end
  else
    redis.call('HSET', s, 'state', 'open', 'changed_at', now, 'until', now + tonumber(ARGV[5]), 'probes', 0, 'probes_ok', 0)
    redis.call('HINCRBY', s, 'opened', 1)
    moved(was, 'open', now, 'probe_failed')
    return 'open'
  end
  return ''
end
if state == 'closed' then
  local calls, failures = 0, 0
  for i = sec - window + 1, sec do
    local v = redis.call('HMGET', KEYS[1] .. 'w:' .. i, 'calls', 'failures')
    calls = calls + tonumber(v[1] or '0'); failures = failures + tonumber(v[2] or '0')
  end
  if calls >= tonumber(ARGV[3]) and failures >= tonumber(ARGV[4]) * calls then
    redis.call('HSET', s, 'state', 'open', 'changed_at', now, 'until', now + tonumber(ARGV[5]), 'probes', 0, 'probes_ok', 0)
    redis.call('HINCRBY', s, 'opened', 1)
    moved('closed', 'open', now, 'failure_rate')
    return 'open'
  end
end
return ''
"""
)
# The same ARGV (ok unused); returns {admitted, state, retry_at, now} (numbers as strings).
_ADMIT = (
    _MOVED
    + """
local t = redis.call('TIME'); local now = tonumber(t[1]) + tonumber(t[2]) / 1e6
local s = KEYS[1] .. 'state'
local state = redis.call('HGET', s, 'state') or 'closed'
if state == 'closed' then return {1, state, '0', tostring(now)} end
if state == 'open' then
  local u = tonumber(redis.call('HGET', s, 'until') or '0')
  if now < u then return {0, state, tostring(u), tostring(now)} end
  redis.call('HSET', s, 'state', 'half_open', 'changed_at', now, 'probes', 0, 'probes_ok', 0)
  moved('open', 'half_open', now, 'open_period_over')
  state = 'half_open'
elseif now >= tonumber(redis.call('HGET', s, 'changed_at') or '0') + tonumber(ARGV[5]) then
  -- half-open for a whole open period without a verdict: a probe's caller died before it
  -- recorded its outcome. A fresh round of probes, so the reservation cannot stay taken.
  redis.call('HSET', s, 'changed_at', now, 'probes', 0, 'probes_ok', 0)
  moved('half_open', 'half_open', now, 'probes_expired')
end
if redis.call('HINCRBY', s, 'probes', 1) <= tonumber(ARGV[6]) then return {1, state, '0', tostring(now)} end
redis.call('HINCRBY', s, 'probes', -1)
return {0, state, tostring(now + tonumber(ARGV[7])), tostring(now)}
"""
)
# `admit` without reserving anything or changing the state: would a call be refused now?
_PEEK = """
local t = redis.call('TIME'); local now = tonumber(t[1]) + tonumber(t[2]) / 1e6
local s = KEYS[1] .. 'state'
local v = redis.call('HMGET', s, 'state', 'until', 'probes', 'changed_at')
local state = v[1] or 'closed'
if state == 'closed' then return {1, state, '0', tostring(now)} end
if state == 'open' then
  local u = tonumber(v[2] or '0')
  if now < u then return {0, state, tostring(u), tostring(now)} end
  return {1, 'half_open', '0', tostring(now)}
end
if tonumber(v[3] or '0') < tonumber(ARGV[6]) or now >= tonumber(v[4] or '0') + tonumber(ARGV[5]) then
  return {1, state, '0', tostring(now)}
end
return {0, state, tostring(now + tonumber(ARGV[7])), tostring(now)}
"""
# An operator's reset (ARGV[8] = 'closed') or forced opening (ARGV[8] = 'open', for ARGV[9]
# seconds); ARGV[10] = who. Returns the state it was in.
_FORCE = (
    _MOVED
    + """
local t = redis.call('TIME'); local now = tonumber(t[1]) + tonumber(t[2]) / 1e6
local s = KEYS[1] .. 'state'
local was = redis.call('HGET', s, 'state') or 'closed'
if ARGV[8] == 'closed' then
  local sec = math.floor(now)
  for i = sec - tonumber(ARGV[2]) - 5, sec do redis.call('DEL', KEYS[1] .. 'w:' .. i) end
  redis.call('HSET', s, 'state', 'closed', 'changed_at', now, 'probes', 0, 'probes_ok', 0)
  redis.call('HDEL', s, 'until')
else
  redis.call('HSET', s, 'state', 'open', 'changed_at', now, 'until', now + tonumber(ARGV[9]), 'probes', 0, 'probes_ok', 0)
  redis.call('HINCRBY', s, 'opened', 1)
end
moved(was, ARGV[8], now, ARGV[10])
return was
"""
)
# Everything the admin shows: {now, state hash, calls, failures (in the window), log, transitions}.
_DETAIL = """
local t = redis.call('TIME'); local now = tonumber(t[1]) + tonumber(t[2]) / 1e6
local sec = math.floor(now)
local calls, failures = 0, 0
for i = sec - tonumber(ARGV[2]) + 1, sec do
  local v = redis.call('HMGET', KEYS[1] .. 'w:' .. i, 'calls', 'failures')
  calls = calls + tonumber(v[1] or '0'); failures = failures + tonumber(v[2] or '0')
end
return {tostring(now), redis.call('HGETALL', KEYS[1] .. 'state'), calls, failures,
        redis.call('LRANGE', KEYS[1] .. 'log', 0, -1), redis.call('HGETALL', KEYS[1] .. 'transitions')}
"""


class _Memory:
    """The embedded mode's breakers (one process): the same rules, under a lock."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.buckets: dict[str, dict[int, list[int]]] = {}
        self.states: dict[str, dict[str, Any]] = {}
        self.logs: dict[str, deque[str]] = {}
        self.transitions: dict[str, Counter[str]] = {}

    def _state(self, name: str) -> dict[str, Any]:
        return self.states.setdefault(name, {"state": CLOSED, "opened": 0})

    def _moved(self, name: str, was: str, to: str, now: float, by: str) -> None:
        self.logs.setdefault(name, deque(maxlen=LOG_LENGTH)).appendleft(f"{now:.3f}|{was}|{to}|{by}")
        self.transitions.setdefault(name, Counter())[to] += 1

    def record(self, name: str, ok: bool, config: list[Any]) -> str:
        window, min_calls, rate, open_s, probes, _ = config
        now = time.time()
        with self.lock:
            buckets = self.buckets.setdefault(name, {})
            bucket = buckets.setdefault(int(now), [0, 0])
            bucket[0] += 1
            bucket[1] += 0 if ok else 1
            for old in [b for b in buckets if b <= now - window - 5]:
                del buckets[old]
            s = self._state(name)
            was = s["state"]
            if s["state"] == OPEN and not ok and now >= s["until"]:
                s["state"] = HALF_OPEN  # the open period is over and it still fails: a failed probe
            if s["state"] == HALF_OPEN:
                if not ok:
                    s.update(state=OPEN, changed_at=now, until=now + open_s, probes=0, probes_ok=0)
                    s["opened"] += 1
                    self._moved(name, was, OPEN, now, "probe_failed")
                    return OPEN
                s["probes_ok"] = s.get("probes_ok", 0) + 1
                if s["probes_ok"] >= probes:
                    buckets.clear()  # closed afresh: the outage no longer counts
                    s.update(state=CLOSED, changed_at=now, probes=0, probes_ok=0)
                    self._moved(name, HALF_OPEN, CLOSED, now, "probes_succeeded")
                    return CLOSED
                return ""
            if s["state"] == CLOSED:
                seen = [v for b, v in buckets.items() if b > now - window]
                calls, failures = sum(v[0] for v in seen), sum(v[1] for v in seen)
                if calls >= min_calls and failures >= rate * calls:
                    s.update(state=OPEN, changed_at=now, until=now + open_s, probes=0, probes_ok=0)
                    s["opened"] += 1
                    self._moved(name, CLOSED, OPEN, now, "failure_rate")
                    return OPEN
            return ""

    def admit(self, name: str, config: list[Any], *, reserve: bool = True) -> Verdict:
        probes, probe_wait = config[4], config[5]
        now = time.time()
        with self.lock:
            s = self._state(name)
            if s["state"] == CLOSED:
                return Verdict(True, CLOSED, 0.0, now)
            if s["state"] == OPEN:
                if now < s["until"]:
                    return Verdict(False, OPEN, s["until"], now)
                if not reserve:
                    return Verdict(True, HALF_OPEN, 0.0, now)
                s.update(state=HALF_OPEN, changed_at=now, probes=0, probes_ok=0)
                self._moved(name, OPEN, HALF_OPEN, now, "open_period_over")
            elif now >= s.get("changed_at", 0) + config[3]:
                # Half-open for a whole open period without a verdict: a fresh round of probes.
                if not reserve:
                    return Verdict(True, HALF_OPEN, 0.0, now)
                s.update(changed_at=now, probes=0, probes_ok=0)
                self._moved(name, HALF_OPEN, HALF_OPEN, now, "probes_expired")
            if s.get("probes", 0) < probes:
                if reserve:
                    s["probes"] = s.get("probes", 0) + 1
                return Verdict(True, HALF_OPEN, 0.0, now)
            return Verdict(False, HALF_OPEN, now + probe_wait, now)

    def force(self, name: str, to: str, seconds: float, by: str) -> str:
        now = time.time()
        with self.lock:
            s = self._state(name)
            was = str(s["state"])
            if to == CLOSED:
                self.buckets.pop(name, None)
                s.update(state=CLOSED, changed_at=now, probes=0, probes_ok=0)
                s.pop("until", None)
            else:
                s.update(state=OPEN, changed_at=now, until=now + seconds, probes=0, probes_ok=0)
                s["opened"] += 1
            self._moved(name, was, to, now, by)
            return was

    def detail(self, name: str, window: int) -> list[Any]:
        now = time.time()
        with self.lock:
            seen = [v for b, v in self.buckets.get(name, {}).items() if b > int(now) - window]
            return [
                now,
                {k: str(v) for k, v in self.states.get(name, {}).items()},
                sum(v[0] for v in seen),
                sum(v[1] for v in seen),
                list(self.logs.get(name, ())),
                dict(self.transitions.get(name, {})),
            ]

    def read(self, names: list[str]) -> dict[str, dict[str, Any]]:
        with self.lock:
            found = {n: self.states.get(n, {}) for n in names}
        return {
            n: {
                "state": s.get("state", CLOSED),
                "changed_at": s.get("changed_at"),
                "until": s.get("until"),
                "opened": s.get("opened", 0),
            }
            for n, s in found.items()
        }


@cache
def _store() -> _Memory | redis.Redis:
    config = settings.CACHES["default"]
    if not config["BACKEND"].endswith("RedisCache"):
        return _Memory()
    import redis

    return redis.Redis.from_url(config["LOCATION"], socket_timeout=1, socket_connect_timeout=1, decode_responses=True)


def enabled() -> bool:
    return settings.BREAKER_ENABLED


def record(name: str, ok: bool) -> str:
    """Count one call's outcome; returns the state it moved to ("" if none, or if the outcome is
    held by `together` until the next question). Never raises."""
    if not enabled():
        return ""
    store = _store()
    if isinstance(store, _Memory):
        moved = store.record(name, ok, _config())
        _log_moved(name, moved)
        return moved
    held = getattr(_held, "outcomes", None)
    if held is not None:
        held.append((name, ok))
        return ""
    return str(_send(store, [(name, ok)])[0])


_held = threading.local()


@contextlib.contextmanager
def together() -> Iterator[None]:
    """Hold the outcomes recorded inside this block and send them with the next question asked
    of a breaker (`admit`, `peek`), in the same Redis round trip and before it, or when the
    block ends: the orchestrator applying a reply and starting the next step asks Redis once,
    not twice. Redis sees every outcome before any later question, as without the block."""
    if getattr(_held, "outcomes", None) is not None:
        yield
        return
    _held.outcomes = []
    try:
        yield
    finally:
        outcomes, _held.outcomes = _held.outcomes, None
        if outcomes and enabled() and not isinstance(store := _store(), _Memory):
            _send(store, outcomes)


def _send(store: redis.Redis, outcomes: list[tuple[str, bool]], questions: Sequence[tuple[str, str]] = ()) -> list[Any]:
    """Record `outcomes` in order, then ask `questions` ((name, script) each, in order), in one
    round trip; the states the outcomes moved to, then each question's answer. An outcome that
    cannot be recorded is logged and dropped (a breaker must never fail its caller); the caller
    of a question sees the error."""
    pipe = store.pipeline(transaction=False)
    # The attempts' `answered` marks held by an inline drain ride along (kernel/attempts.py).
    marks = attempts.queue_held(pipe)
    for name, ok in outcomes:
        pipe.sadd(INDEX, name)
        _script(pipe, _RECORD, name, int(ok))
    for name, script in questions:
        _script(pipe, script, name, 0)
    try:
        answers = _execute(store, pipe, marks=len(marks))[len(marks) :]
    except Exception:
        if marks:
            attempts.hold_again(marks)
        if questions:
            raise
        logger.warning("breakers %s: outcomes not recorded", sorted({n for n, _ in outcomes}), exc_info=True)
        return [""] * len(outcomes)
    moved = [str(answer) for answer in answers[1 : 2 * len(outcomes) : 2]]
    for (name, _), state in zip(outcomes, moved, strict=True):
        _log_moved(name, state)
    return [*moved, *answers[2 * len(outcomes) :]]


def _log_moved(name: str, moved: str) -> None:
    if moved:
        logger.warning("circuit breaker %s is now %s", name, moved, extra={"breaker": name})


# The scripts run by digest, and their digests (Redis's SHA-1 of the text).
_SHAS: dict[str, str] = {
    script: hashlib.sha1(script.encode(), usedforsecurity=False).hexdigest() for script in (_RECORD, _ADMIT, _PEEK)
}


def _script(pipe: Any, script: str, name: str, ok: int) -> None:
    """Queue `script` on the pipeline by its digest (EVALSHA: Redis keeps it compiled; the 1-2 KB
    of Lua travel only when Redis lacks it, `_execute`)."""
    pipe.evalsha(_SHAS[script], 1, f"{PREFIX}{name}:", ok, *_config())


def load_scripts(store: redis.Redis | None = None) -> None:
    """Load every script run by digest into Redis: after a miss (`_execute`), all of them, so a
    restarted Redis costs one reload, not one per script as each is first asked for."""
    redis_store = store or _store()
    if isinstance(redis_store, _Memory):
        return
    for script in _SHAS:
        redis_store.script_load(script)


def _execute(store: redis.Redis, pipe: Any, *, marks: int = 0) -> list[Any]:
    """Run the pipeline; where Redis lacked a script (after a restart or a flush) load the
    scripts and run those commands again (a refused EVALSHA ran nothing; the other commands ran).
    Raises the first error left, except in the first `marks` answers (attempt marks riding
    along: a hint, logged, never the breaker's failure)."""
    import redis

    commands = list(pipe.command_stack)  # `execute` empties it
    answers: list[Any] = pipe.execute(raise_on_error=False)
    missing = [i for i, answer in enumerate(answers) if isinstance(answer, redis.exceptions.NoScriptError)]
    if missing:
        load_scripts(store)
        again: Any = store.pipeline(transaction=False)
        for i in missing:
            args, options = commands[i]
            again.execute_command(*args, **options)
        for i, answer in zip(missing, again.execute(raise_on_error=False), strict=True):
            answers[i] = answer
    for i, answer in enumerate(answers):
        if isinstance(answer, Exception):
            if i < marks:
                logger.warning("an attempt mark was not written: %s", answer)
                continue
            raise answer
    return answers


def admit(name: str) -> Verdict:
    """May a call go to `name` now? Closed: yes. Open: no, until the open period ends. Half-open:
    yes for the first BREAKER_HALF_OPEN_PROBES askers, then no. Unknown (Redis down): yes."""
    return _ask(name, _ADMIT, reserve=True)


def admit_many(names: list[str]) -> list[Verdict]:
    """`admit` for each of `names` in turn (one name may come more than once: each asks for a
    call, and may take a half-open probe), in one Redis round trip: the steps one engine run
    starts together (parallel steps) ask once, not once each."""
    if len(names) <= 1 or not enabled():
        return [admit(name) for name in names]
    store = _store()
    try:
        if isinstance(store, _Memory):
            return [store.admit(name, _config(), reserve=True) for name in names]
        held = getattr(_held, "outcomes", None) or []
        if held:
            _held.outcomes = []
        answers = _send(store, held, [(name, _ADMIT) for name in names])[len(held) :]
        return [_verdict(answer) for answer in answers]
    except Exception:
        logger.warning("breakers %s: state not readable; admitting", sorted(set(names)), exc_info=True)
        return [Verdict(True, CLOSED) for _ in names]


def _verdict(answer: Any) -> Verdict:
    admitted, state, retry_at, now = answer
    return Verdict(bool(int(admitted)), state, float(retry_at), float(now))


def peek(name: str) -> Verdict:
    """Would `admit` refuse a call now? Reserves no probe and changes nothing: for a caller that
    only decides whether to wait (another call, later, asks `admit`)."""
    return _ask(name, _PEEK, reserve=False)


def _ask(name: str, script: str, *, reserve: bool) -> Verdict:
    if not enabled():
        return Verdict(True, CLOSED)
    store = _store()
    try:
        if isinstance(store, _Memory):
            return store.admit(name, _config(), reserve=reserve)
        held = getattr(_held, "outcomes", None) or []
        if held:
            _held.outcomes = []
        return _verdict(_send(store, held, [(name, script)])[-1])
    except Exception:
        logger.warning("breaker %s: state not readable; admitting", name, exc_info=True)
        return Verdict(True, CLOSED)


def resume_delay(verdict: Verdict) -> float:
    """Seconds a call refused by `verdict` waits: until the breaker may admit again, plus a
    jitter spread over BREAKER_RESUME_SPREAD so the backlog does not return all at once."""
    wait = max(0.0, verdict.retry_at - verdict.now) if verdict.retry_at else settings.BREAKER_PROBE_WAIT
    return wait + random.uniform(0, settings.BREAKER_RESUME_SPREAD)


def force(name: str, to: str, *, by: str, seconds: float | None = None) -> str:
    """An operator's action: close `name` afresh (its window forgotten), or open it for `seconds`
    (BREAKER_OPEN_SECONDS by default; then it probes as usual). Logged as a transition `by` whom.
    Returns the state it was in. Raises if the state cannot be written (Redis down)."""
    if to not in (CLOSED, OPEN):
        raise ValueError(f"a breaker can be forced closed or open, not {to!r}")
    seconds = settings.BREAKER_OPEN_SECONDS if seconds is None else seconds
    by = by.replace("|", "/")[:150]
    store = _store()
    if isinstance(store, _Memory):
        was = store.force(name, to, seconds, by)
    else:
        pipe = store.pipeline(transaction=False)
        pipe.sadd(INDEX, name)
        pipe.eval(_FORCE, 1, f"{PREFIX}{name}:", 0, *_config(), to, seconds, by)
        was = str(pipe.execute()[1])
    logger.warning("circuit breaker %s forced %s by %s (was %s)", name, to, by, was, extra={"breaker": name})
    return was


def names() -> list[str]:
    """Every breaker that has counted a call or been forced."""
    store = _store()
    if isinstance(store, _Memory):
        with store.lock:
            return sorted(store.states)
    return sorted(cast("set[str]", store.smembers(INDEX)))


def detail(names: list[str]) -> dict[str, dict[str, Any]]:
    """What the admin and the metrics show of each breaker: its state, the calls and failures in
    the window and their rate, when it changed, when an open one probes, the probes reserved
    and succeeded, how often it opened, its transitions counted per state entered, and its
    recent transitions (newest first). Raises if the store does not answer."""
    store = _store()
    window = settings.BREAKER_WINDOW
    if isinstance(store, _Memory):
        raw = {name: store.detail(name, window) for name in names}
    else:
        pipe = store.pipeline(transaction=False)
        for name in names:
            pipe.eval(_DETAIL, 1, f"{PREFIX}{name}:", 0, window)
        raw = {}
        for name, (now, flat, calls, failures, log, counts) in zip(names, pipe.execute(), strict=True):
            raw[name] = [float(now), _pairs(flat), int(calls), int(failures), log, _pairs(counts)]
    out = {}
    for name, (now, s, calls, failures, log, counts) in raw.items():
        state = s.get("state", CLOSED)
        until = float(s["until"]) if s.get("until") and state == OPEN else None
        out[name] = {
            "state": state,
            "now": now,
            "calls": calls,
            "failures": failures,
            "failure_rate": round(failures / calls, 3) if calls else None,
            "changed_at": float(s["changed_at"]) if s.get("changed_at") else None,
            "half_open_at": until,
            "probes_reserved": int(float(s.get("probes", 0))) if state == HALF_OPEN else 0,
            "probes_succeeded": int(float(s.get("probes_ok", 0))) if state == HALF_OPEN else 0,
            "opened": int(float(s.get("opened", 0))),
            "transitions": {k: int(v) for k, v in counts.items()},
            "recent": [_transition(line) for line in log],
        }
    return out


def _pairs(flat: list[Any]) -> dict[str, str]:
    return {str(flat[i]): flat[i + 1] for i in range(0, len(flat), 2)}


def _transition(line: str) -> dict[str, Any]:
    at, was, to, by = [*line.split("|", 3), "", "", ""][:4]
    return {"at": float(at), "from": was, "to": to, "by": by}


def states(names: list[str] | None = None) -> dict[str, dict[str, Any]]:
    """Each known breaker's state: {name: {state, changed_at, until, opened}}."""
    store = _store()
    try:
        if isinstance(store, _Memory):
            names = names or sorted(store.states)
            return store.read(names)
        names = names or sorted(cast("set[str]", store.smembers(INDEX)))  # decode_responses: str
        pipe = store.pipeline(transaction=False)
        for name in names:
            pipe.hgetall(f"{PREFIX}{name}:state")
        found = pipe.execute()
    except Exception:
        logger.warning("breaker states not readable", exc_info=True)
        return {}
    out = {}
    for name, raw in zip(names, found, strict=True):
        out[name] = {
            "state": raw.get("state", CLOSED),
            "changed_at": float(raw["changed_at"]) if raw.get("changed_at") else None,
            "until": float(raw["until"]) if raw.get("until") else None,
            "opened": int(raw.get("opened", 0)),
        }
    return out


def reset() -> None:
    """Forget every breaker (tests, and the simulation between its runs)."""
    store = _store()
    if isinstance(store, _Memory):
        with store.lock:
            store.buckets.clear()
            store.states.clear()
            store.logs.clear()
            store.transitions.clear()
        return
    # SCAN walks the whole database, 10 keys a round trip unless told otherwise.
    keys = list(store.scan_iter(f"{PREFIX}*", count=1000))
    if keys:
        store.delete(*keys)
