"""Each xdist worker's Redis database (tests/xdist_env.py): two workers must never share one, or
one worker's end-to-end test would empty (`flush_broker`) the queues the other's workers use."""

from __future__ import annotations

from tests.xdist_env import redis_url_for


def test_each_worker_gets_the_database_below_the_previous_ones():
    assert redis_url_for("redis://127.0.0.1:6379/15", 0) == "redis://127.0.0.1:6379/15"
    assert redis_url_for("redis://127.0.0.1:6379/15", 1) == "redis://127.0.0.1:6379/14"
    assert redis_url_for("redis://:secret@cache:6380/3", 2) == "redis://:secret@cache:6380/1"


def test_the_numbers_wrap_within_redis_sixteen_databases():
    assert redis_url_for("redis://127.0.0.1:6379", 1) == "redis://127.0.0.1:6379/15"
    assert redis_url_for("redis://127.0.0.1:6379/0", 0) == "redis://127.0.0.1:6379/0"
    assert len({redis_url_for("redis://h/9", index) for index in range(16)}) == 16
