"""The breaker store, in Redis and in the embedded mode's memory alike: a half-open breaker whose
probes never report back (their callers died) does not stay half-open with every probe reserved
(after another open period a fresh round is admitted); an operator's reset and forced opening;
what `detail` reports."""

from __future__ import annotations

import pytest

from sagaplatform.kernel import breakers
from tests.processes import wait_for


@pytest.fixture(autouse=True, params=["redis", "memory"])
def store(request, monkeypatch):
    if request.param == "memory":
        memory = breakers._Memory()
        monkeypatch.setattr(breakers, "_store", lambda: memory)
    elif isinstance(breakers._store(), breakers._Memory):
        pytest.skip("no Redis: the embedded mode's store is the memory one")
    return request.param


@pytest.fixture(autouse=True)
def breaker_on(settings, store):
    settings.BREAKER_ENABLED = True
    settings.BREAKER_MIN_CALLS = 4
    settings.BREAKER_FAILURE_RATE = 0.5
    settings.BREAKER_OPEN_SECONDS = 0.3
    settings.BREAKER_HALF_OPEN_PROBES = 2
    settings.BREAKER_PROBE_WAIT = 0.1
    breakers.reset()
    yield
    breakers.reset()


def test_probes_that_never_report_back_are_given_up_after_an_open_period():
    for _ in range(4):
        breakers.record("payments", False)
    first = wait_for(lambda: (v := breakers.admit("payments")).admitted and v, timeout=5, message="half-open")
    assert first.state == "half_open"
    assert breakers.admit("payments").admitted  # the second probe; neither ever reports back
    refused = breakers.admit("payments")
    assert (refused.admitted, refused.state) == (False, "half_open")
    assert not breakers.peek("payments").admitted

    # After another open period with no verdict: a fresh round of (two) probes.
    wait_for(lambda: breakers.peek("payments").admitted, timeout=5, message="the probes to expire")
    assert breakers.admit("payments").admitted
    assert breakers.admit("payments").admitted
    assert not breakers.admit("payments").admitted
    recent = breakers.detail(["payments"])["payments"]["recent"]
    assert [(t["from"], t["to"], t["by"]) for t in recent] == [
        ("half_open", "half_open", "probes_expired"),
        ("open", "half_open", "open_period_over"),
        ("closed", "open", "failure_rate"),
    ]
    # Their verdict still decides as usual.
    breakers.record("payments", True)
    assert breakers.record("payments", True) == "closed"


def test_an_operator_forces_a_breaker_open_then_resets_it(settings):
    settings.BREAKER_OPEN_SECONDS = 60
    breakers.record("shipping", True)
    breakers.record("shipping", False)
    assert breakers.force("shipping", "open", by="user:ops", seconds=120) == "closed"
    refused = breakers.admit("shipping")
    assert not refused.admitted
    assert 119 < refused.retry_at - refused.now <= 120
    breakers.record("shipping", True)  # a late success does not close a forced-open breaker
    assert breakers.states(["shipping"])["shipping"]["state"] == "open"

    assert breakers.force("shipping", "closed", by="user:ops") == "open"
    shipping = breakers.detail(["shipping"])["shipping"]
    assert shipping["state"] == "closed"
    assert (shipping["calls"], shipping["failures"], shipping["failure_rate"]) == (0, 0, None)  # closed afresh
    assert shipping["half_open_at"] is None
    assert shipping["opened"] == 1
    assert shipping["transitions"] == {"open": 1, "closed": 1}
    assert [(t["from"], t["to"], t["by"]) for t in shipping["recent"]] == [
        ("open", "closed", "user:ops"),
        ("closed", "open", "user:ops"),
    ]
    assert breakers.admit("shipping").admitted
    assert "shipping" in breakers.names()
    with pytest.raises(ValueError, match="forced closed or open"):
        breakers.force("shipping", "half_open", by="user:ops")


def test_detail_counts_the_window_and_its_failure_rate():
    for ok in (True, True, False):
        breakers.record("inventory", ok)
    inventory = breakers.detail(["inventory", "orders"])
    assert (inventory["inventory"]["calls"], inventory["inventory"]["failures"]) == (3, 1)
    assert inventory["inventory"]["failure_rate"] == 0.333
    assert inventory["orders"]["state"] == "closed"
    assert inventory["orders"]["recent"] == []


def test_outcomes_held_together_reach_the_breaker_before_the_next_question(store, monkeypatch):
    """`together` (the orchestrator applying replies) sends the outcomes it holds with the next
    admission, in one Redis round trip and ahead of it: failures that open the breaker refuse
    the admission asked after them, as they would one at a time."""
    import redis

    trips = []
    execute = redis.client.Pipeline.execute
    monkeypatch.setattr(
        redis.client.Pipeline, "execute", lambda self, *a, **k: trips.append(1) or execute(self, *a, **k)
    )
    with breakers.together():
        moved = [breakers.record("payments", False) for _ in range(4)]
        refused = breakers.admit("payments")
        breakers.record("shipping", False)
    round_trips = len(trips)
    assert (refused.admitted, refused.state) == (False, "open")
    assert breakers.detail(["shipping"])["shipping"]["failures"] == 1  # sent when the block ended
    if store == "redis":
        assert moved == ["", "", "", ""]  # held: the move to open is logged when sent
        assert round_trips == 2  # four outcomes and the admission, then the last outcome


def test_a_breaker_whose_scripts_redis_forgot_loads_them_again(store):
    """Scripts run by their digest (EVALSHA); after a Redis restart or SCRIPT FLUSH the next call
    loads them and runs again, counting each outcome once."""
    if store != "redis":
        pytest.skip("Redis only")
    breakers.record("payments", False)
    breakers._store().script_flush()
    with breakers.together():
        breakers.record("payments", False)
        assert breakers.admit("payments").admitted
    breakers._store().script_flush()
    breakers.record("payments", True)
    assert breakers.detail(["payments"])["payments"]["calls"] == 3
    assert breakers.detail(["payments"])["payments"]["failures"] == 2


def test_a_forgotten_script_reloads_them_all_at_once(store, monkeypatch):
    """After a flush the first miss loads every script: the next kind of question asked (an
    admission after an outcome) finds its script there and needs no second reload."""
    if store != "redis":
        pytest.skip("Redis only")
    breakers._store().script_flush()
    reloads = []
    load = breakers.load_scripts
    monkeypatch.setattr(breakers, "load_scripts", lambda *args: reloads.append(1) or load(*args))
    breakers.record("inventory", True)
    assert breakers.admit("inventory").admitted
    assert breakers.peek("inventory").admitted
    assert reloads == [1]


def test_answered_marks_held_by_a_drain_ride_with_the_next_breaker_round_trip(store, monkeypatch):
    """Inside an inline drain (`attempts.answers_held`) a command's `answered` mark costs no Redis
    round trip of its own: it goes in the pipeline of the next breaker question asked on this
    thread (the orchestrator applying that reply), or, if none is asked, when the drain ends.
    Outside a drain it is written at once, as are `started` marks."""
    import uuid

    import redis

    from sagaplatform.kernel import attempts

    if store != "redis":
        pytest.skip("Redis only: the embedded mode's marks are in memory")
    trips = []
    execute = redis.client.Pipeline.execute
    monkeypatch.setattr(
        redis.client.Pipeline,
        "execute",
        lambda self, *a, **k: trips.append(len(self.command_stack)) or execute(self, *a, **k),
    )
    saga = uuid.uuid4()
    first, second, outside = (attempts.key(saga, step, "action", 1) for step in ("reserve", "charge", "ship"))
    attempts.mark_many_started([first, second, outside])
    assert len(trips) == 1

    def state(mark_key):
        return attempts.read([mark_key])[mark_key].state

    with attempts.answers_held():
        attempts.mark_answered(first)
        assert len(trips) == 1  # held
        assert state(first) == attempts.STARTED
        asked = len(trips)
        with breakers.together():
            breakers.record("payments", True)
            assert breakers.admit("payments").admitted  # the held mark goes with this question
        assert len(trips) == asked + 1
        assert trips[-1] == 4  # the mark, the breaker's index and outcome, the question
        assert state(first) == attempts.ANSWERED
        attempts.mark_answered(second)
        asked = len(trips)
    assert len(trips) == asked + 1  # no question asked: written when the drain ended
    assert state(second) == attempts.ANSWERED
    attempts.mark_answered(outside)
    assert state(outside) == attempts.ANSWERED  # outside a drain: at once
    assert breakers.detail(["payments"])["payments"]["calls"] == 1


def test_a_held_answered_mark_does_not_disturb_the_breakers_answers(store):
    """The marks' answers come first in the shared pipeline; the breaker still reads its own: an
    outcome that opens it refuses the question asked after it."""
    import uuid

    from sagaplatform.kernel import attempts

    if store != "redis":
        pytest.skip("Redis only")
    mark = attempts.key(uuid.uuid4(), "charge", "action", 1)
    attempts.mark_started(mark)
    with attempts.answers_held(), breakers.together():
        attempts.mark_answered(mark)
        moved = [breakers.record("payments", False) for _ in range(4)]
        refused = breakers.admit("payments")
    assert moved == ["", "", "", ""]
    assert (refused.admitted, refused.state) == (False, "open")
    assert attempts.read([mark])[mark].state == attempts.ANSWERED


def test_admissions_asked_together_are_decided_in_turn(store, monkeypatch):
    """`admit_many` asks each name's breaker in order, as many `admit` calls would (a half-open
    breaker's probes go to the first askers; a closed one admits; an open one refuses), held
    outcomes first, and in Redis in one round trip."""
    import redis

    for _ in range(4):
        breakers.record("payments", False)
    wait_for(lambda: breakers.peek("payments").state == "half_open", timeout=5, message="half-open")
    trips = []
    execute = redis.client.Pipeline.execute
    monkeypatch.setattr(
        redis.client.Pipeline, "execute", lambda self, *a, **k: trips.append(1) or execute(self, *a, **k)
    )
    with breakers.together():
        breakers.record("inventory", True)
        verdicts = breakers.admit_many(["payments", "inventory", "payments", "payments"])
    round_trips = len(trips)
    assert [(v.admitted, v.state) for v in verdicts] == [
        (True, "half_open"),
        (True, "closed"),
        (True, "half_open"),
        (False, "half_open"),  # two probes at once, as configured
    ]
    assert breakers.detail(["inventory"])["inventory"]["calls"] == 1  # the held outcome went first
    if store == "redis":
        assert round_trips == 1


def test_held_marks_shift_no_breaker_answer_and_survive_a_failed_round_trip(store, monkeypatch):
    """The marks' answers come first in the pipeline they ride: an outcome recorded with a
    mark still reports the move it caused, and questions asked with one still get their own
    answers. A pipeline that fails gives its marks back to the hold (written when it ends),
    and a mark that Redis refuses is logged, never taken for the breaker's answer."""
    import uuid

    import redis

    from sagaplatform.kernel import attempts

    if store != "redis":
        pytest.skip("Redis only")
    first, second, third = (attempts.key(uuid.uuid4(), "charge", "action", 1) for _ in range(3))
    attempts.mark_many_started([first, second, third])
    with attempts.answers_held():
        attempts.mark_answered(first)
        moved = [breakers.record("payments", False) for _ in range(4)]  # the first carries the mark
        attempts.mark_answered(second)
        refused = breakers.admit_many(["payments", "payments"])
    assert moved == ["", "", "", "open"]
    assert [v.admitted for v in refused] == [False, False]
    assert {attempts.read([k])[k].state for k in (first, second)} == {attempts.ANSWERED}

    def failing(*args, **kwargs):
        raise redis.exceptions.ConnectionError("Redis went away")

    with attempts.answers_held():
        attempts.mark_answered(third)
        with monkeypatch.context() as patched:
            patched.setattr(breakers, "_execute", failing)
            assert breakers.admit("inventory").admitted  # unknown: admits, as ever
        assert attempts.read([third])[third].state == attempts.STARTED  # held again, not lost
    assert attempts.read([third])[third].state == attempts.ANSWERED

    store_ = breakers._store()
    store_.set("not-a-number", "x")
    pipe = store_.pipeline(transaction=False)
    pipe.incr("not-a-number")  # refused by Redis, as a mark might be
    pipe.get("not-a-number")
    assert breakers._execute(store_, pipe, marks=1)[1] == "x"
    pipe = store_.pipeline(transaction=False)
    pipe.incr("not-a-number")
    with pytest.raises(redis.exceptions.ResponseError):
        breakers._execute(store_, pipe)
    store_.delete("not-a-number")


def test_held_marks_are_written_when_flushed(store):
    """`flush_held(keys)` (the end of a drain's round that asked no breaker) writes those of
    `keys` still held, at once, and keeps the others held."""
    import uuid

    from sagaplatform.kernel import attempts

    if store != "redis":
        pytest.skip("Redis only: the embedded mode writes its marks to memory at once")
    older, newer = (attempts.key(uuid.uuid4(), "ship", "action", 1) for _ in range(2))
    attempts.mark_many_started([older, newer])
    with attempts.answers_held():
        attempts.mark_answered(older)
        carried = attempts.held_now()
        attempts.mark_answered(newer)
        attempts.flush_held(carried)
        assert attempts.read([older])[older].state == attempts.ANSWERED
        assert attempts.read([newer])[newer].state == attempts.STARTED  # held until its round ends
        assert attempts.held_now() == [newer]
    assert attempts.read([newer])[newer].state == attempts.ANSWERED
