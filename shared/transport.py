"""kombu's Redis transport: one that keeps a Redis client object per channel for publishing (web),
and one whose acknowledgements never leave a worker unable to fetch (workers).

kombu builds a new `redis.Redis` for every publish (`Channel.conn_or_acquire`), and redis-py
fills a ~170-entry response-callback table in each constructor: about a fifth of the listener's
publish cost. A redis-py client is thread-safe and shares the channel's connection pool, so the
channel can keep one; it is rebuilt whenever the channel replaces its pool (after a reconnect).
Used by the web process only (`broker.create_app(..., publisher=True)`).

`WorkerTransport`: kombu's Redis QoS acknowledges a message by first deleting it from Redis'
`unacked` index and only then releasing its local prefetch slot. When Redis dies at that moment,
the delete raises, the slot is never released, and a worker with one slot (a solo real-time
worker: prefetch multiplier 1) believes it still holds a message: it never polls Redis again, so it
never notices the lost connection and consumes nothing more until restarted (seen in
`tests/faults/test_every_flow_restarts.py`: a real-time worker idle for minutes after Redis came
back). Here the slot is released whatever Redis answers; the error still propagates (Celery logs
"Couldn't ack"), the next poll finds the dead connection and the consumer reconnects. A message
whose index entry survived is restored after the visibility timeout and redelivered, which the
ledgers make harmless; one Redis lost is recovered by the sweeper from Postgres.
"""
from __future__ import annotations

from contextlib import contextmanager

from kombu.transport import redis as kombu_redis
from kombu.transport import virtual


class Channel(kombu_redis.Channel):
    """A Redis channel that reuses its client for commands outside a poll."""

    _kept_client = None

    @contextmanager
    def conn_or_acquire(self, client=None):
        if client:
            yield client
            return
        kept = self._kept_client
        if kept is None or kept.connection_pool is not self.pool:
            kept = self._kept_client = self._create_client()
        yield kept


class Transport(kombu_redis.Transport):
    """The Redis transport with `Channel`."""

    Channel = Channel


class ReleasingQoS(kombu_redis.QoS):
    """Redis QoS whose ack and reject release the local prefetch slot even when Redis fails."""

    def ack(self, delivery_tag):
        try:
            self._remove_from_indices(delivery_tag).execute()
        finally:
            virtual.QoS.ack(self, delivery_tag)

    def restore_unacked(self, client=None):
        """Put this channel's unacknowledged messages back, unless the transport is already closed.

        After Redis died, Celery closes the broken connection; a CI run of the fault suite showed
        the channel closing after its transport had dropped its client, and kombu's restore then
        failed building a new pool (`AttributeError: 'NoneType' object has no attribute
        'hostname'`), which Celery does not count as a connection error: "Unrecoverable error", and
        the worker stopped consuming for good. Nothing can reach Redis then anyway; the messages stay
        in its `unacked` index (restored after the visibility timeout) or, if Redis lost them, are
        re-driven by the sweeper from Postgres."""
        if client is None and getattr(self.channel.connection, "client", None) is None:
            self._delivered.clear()
            return
        super().restore_unacked(client)

    def reject(self, delivery_tag, requeue=False):
        try:
            if requeue:
                self.restore_by_tag(delivery_tag, leftmost=True)
            else:
                self._remove_from_indices(delivery_tag).execute()
        finally:
            virtual.QoS.ack(self, delivery_tag)


class WorkerChannel(kombu_redis.Channel):
    """A Redis channel with `ReleasingQoS`."""

    QoS = ReleasingQoS


class WorkerTransport(kombu_redis.Transport):
    """The Redis transport of workers and beat (`broker.create_app`)."""

    Channel = WorkerChannel
