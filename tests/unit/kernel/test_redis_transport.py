"""The platform's Redis transport (`kernel.deadletters.RedisTransport`): a batch's messages are
acknowledged together, in one round trip, and only once the batch is done."""

from __future__ import annotations

import pytest
import redis
from kombu import Connection

from sagaplatform.celery import app as celery_app
from sagaplatform.kernel.deadletters import RedisTransport

pytestmark = pytest.mark.skipif(
    not celery_app.conf.broker_url.startswith("redis://"), reason="the Redis transport needs Redis"
)

OPTIONS = {"unacked_key": "test-transport-unacked", "unacked_index_key": "test-transport-unacked-index"}


@pytest.fixture
def queue():
    client = redis.Redis.from_url(celery_app.conf.broker_url)
    keys = ["test-transport-q", *OPTIONS.values()]
    client.delete(*keys)
    with Connection(celery_app.conf.broker_url, transport=RedisTransport, transport_options=OPTIONS) as connection:
        simple = connection.SimpleQueue("test-transport-q")
        yield simple, client
        simple.close()
    client.delete(*keys)


def test_a_batchs_acknowledgements_go_together_when_it_is_done(queue, monkeypatch):
    simple, client = queue
    for n in range(3):
        simple.put({"n": n})
    messages = [simple.get(timeout=2) for _ in range(3)]
    assert client.hlen(OPTIONS["unacked_key"]) == 3  # held, unacknowledged

    pipelines: list[int] = []
    execute = redis.client.Pipeline.execute

    def counted(self, *args, **kwargs):
        pipelines.append(len(self.command_stack))
        return execute(self, *args, **kwargs)

    monkeypatch.setattr(redis.client.Pipeline, "execute", counted)
    qos = simple.channel.qos
    with qos.together():
        for message in messages:
            message.ack()
        assert client.hlen(OPTIONS["unacked_key"]) == 3  # nothing sent before the block ends
    assert pipelines == [6]  # one round trip: ZREM and HDEL for each of the three
    assert client.hlen(OPTIONS["unacked_key"]) == 0
    assert client.zcard(OPTIONS["unacked_index_key"]) == 0
    # kombu's own bookkeeping: every delivered message is acknowledged (dropped at its next flush)
    assert set(qos._delivered) <= qos._dirty


def test_outside_a_batch_each_acknowledgement_goes_at_once(queue):
    simple, client = queue
    simple.put({"n": 1})
    simple.get(timeout=2).ack()
    assert client.hlen(OPTIONS["unacked_key"]) == 0
