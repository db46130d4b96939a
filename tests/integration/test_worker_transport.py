"""The workers' Redis transport: an ack that Redis cannot take still frees the worker's prefetch slot.

With kombu's stock Redis QoS the slot stays taken, so a worker with one slot (a solo real-time worker)
never polls Redis again and never notices that the connection is gone: after Redis came back it
consumed nothing (found by `tests/faults/test_every_flow_restarts.py`, flow 5 without persistence).
Each test SIGKILLs its own Redis, never the shared one.
"""
from __future__ import annotations

import signal

import pytest
from kombu import Connection, Exchange, Producer, Queue
from kombu.transport import redis as kombu_redis

from cli.embedded import EmbeddedRedis, free_port
from shared.transport import WorkerTransport

pytestmark = pytest.mark.integration


@pytest.fixture
def own_redis(tmp_path):
    server = EmbeddedRedis(tmp_path / "redis", port=free_port(), appendonly=False)
    url = server.start()
    yield server, url
    server.stop()


def _take_one(conn, requeue_into: str = "acks"):
    channel = conn.default_channel
    channel.basic_qos(0, 1, False)  # one slot: a solo worker's prefetch (multiplier 1 x concurrency 1)
    queue = Queue(requeue_into, Exchange(requeue_into, type="direct"), routing_key=requeue_into)(channel)
    queue.declare()
    Producer(channel).publish({"n": 1}, exchange=queue.exchange, routing_key=requeue_into)
    message = queue.get(no_ack=False)
    assert message is not None and message.payload == {"n": 1}
    assert not channel.qos.can_consume(), "the one slot is taken while the message is unacknowledged"
    return channel, message


@pytest.mark.parametrize("settle", ["ack", "reject", "requeue"])
@pytest.mark.parametrize("transport, frees", [(WorkerTransport, True), (kombu_redis.Transport, False)],
                         ids=["relay", "kombu_stock"])
def test_a_settle_redis_cannot_take_still_frees_the_slot(own_redis, transport, frees, settle):
    server, url = own_redis
    with Connection(url, transport=transport) as conn:
        channel, message = _take_one(conn)
        server.stop(signal.SIGKILL)
        with pytest.raises(conn.connection_errors):
            if settle == "ack":
                message.ack()
            else:
                message.reject(requeue=settle == "requeue")
        # kombu's own QoS keeps the slot (the bug this transport exists for); ours frees it
        assert channel.qos.can_consume() is frees


def test_acks_still_reach_redis_when_it_is_up(own_redis):
    _, url = own_redis
    with Connection(url, transport=WorkerTransport) as conn:
        channel, message = _take_one(conn)
        client = channel.client
        assert client.hlen(channel.unacked_key) == 1
        message.ack()
        assert client.hlen(channel.unacked_key) == 0 and channel.qos.can_consume()


@pytest.mark.parametrize("transport, survives", [(WorkerTransport, True), (kombu_redis.Transport, False)],
                         ids=["relay", "kombu_stock"])
def test_closing_a_channel_whose_transport_lost_its_client_does_not_crash(own_redis, transport, survives):
    """The state a CI run's worker died in after Redis was killed: Celery closed the broken
    connection's channel, holding an unacknowledged message, after the transport had dropped its
    client. kombu's restore raised AttributeError (not a connection error: "Unrecoverable error",
    the worker stopped); ours forgets the local delivery (Redis keeps it in `unacked`)."""
    server, url = own_redis
    conn = Connection(url, transport=transport)
    channel, _ = _take_one(conn)
    server.stop(signal.SIGKILL)
    channel._disconnect_pools()   # what the channel's close does first
    conn.transport.client = None  # what closing the transport does
    if survives:
        channel.close()
        assert channel.qos.can_consume()
    else:
        with pytest.raises(AttributeError):
            channel.close()
