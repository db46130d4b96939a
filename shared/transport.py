"""kombu's Redis transport, keeping one Redis client object per channel for publishing.

kombu builds a new `redis.Redis` for every publish (`Channel.conn_or_acquire`), and redis-py
fills a ~170-entry response-callback table in each constructor: about a fifth of the listener's
publish cost. A redis-py client is thread-safe and shares the channel's connection pool, so the
channel can keep one; it is rebuilt whenever the channel replaces its pool (after a reconnect).
Used by the web process only (`broker.create_app(..., publisher=True)`).
"""
from __future__ import annotations

from contextlib import contextmanager

from kombu.transport import redis as kombu_redis


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
