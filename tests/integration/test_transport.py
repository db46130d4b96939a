"""The web's publishing transport keeps one Redis client per channel, rebuilt with a new pool."""
from __future__ import annotations

import pytest

from shared import dispatch
from shared.broker import create_app, publish
from shared.transport import Channel
from tests.conftest import make_settings, queue_lengths
from workers.app import create_celery

pytestmark = pytest.mark.integration


def test_publisher_keeps_its_client_and_delivers(redis_url, database_url):
    app = create_app(make_settings(DATABASE_URL=database_url, REDIS_URL=redis_url), publisher=True)
    with app.producer_pool.acquire(block=True) as producer:
        channel = producer.channel
        assert isinstance(channel, Channel)
        with channel.conn_or_acquire() as first, channel.conn_or_acquire() as second:
            assert first is second
        channel._pool = None  # what kombu does after a lost connection
        with channel.conn_or_acquire() as third:
            assert third is not first and third.connection_pool is channel.pool
    publish(app, [dispatch.process_notification(1, 13), dispatch.process_notification(2, 11)])
    assert queue_lengths(redis_url) == {dispatch.REALTIME: 1, dispatch.NOTIFICATIONS: 1, dispatch.CAMPAIGNS: 0,
                                        dispatch.GRANTS: 0}


def test_workers_keep_kombu_transport(redis_url, database_url):
    app = create_celery(make_settings(DATABASE_URL=database_url, REDIS_URL=redis_url))
    assert not isinstance(app.connection_for_write().default_channel, Channel)
