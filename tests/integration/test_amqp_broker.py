"""The web process with RabbitMQ as the broker (BROKER_URL=amqp://…; Redis keeps the rate limiter).

Uses the `rabbitmq` fixture (tests/rabbitmq.py): a fresh vhost per test on the RabbitMQ at 127.0.0.1:5672,
or on a private server; skipped, saying why, when there is none.
"""
from __future__ import annotations

import pytest

from shared import dispatch
from tests.conftest import TOKEN, make_settings, poll, queue_lengths

pytestmark = pytest.mark.integration

URL = f"/optimove/events?token={TOKEN}"


@pytest.fixture
def vhost(rabbitmq):
    """(vhost name, BROKER_URL) of a fresh vhost, deleted afterwards."""
    name, url = rabbitmq.add_vhost()
    yield name, url
    rabbitmq.delete_vhost(name)


def test_listener_publishes_through_celery_and_metrics_read_the_queues(database_url, redis_url, db, rabbitmq,
                                                                       vhost):
    from web.app import create_app

    name, url = vhost
    app = create_app(make_settings(DATABASE_URL=database_url, REDIS_URL=redis_url, BROKER_URL=url))
    assert app.extensions["direct_publisher"] is None
    client = app.test_client()
    response = client.post(URL, json={"EventTypeID": 13, "TimeStamp": "2026-11-27 05:04:54", "CampaignID": "1111",
                                      "ChannelID": 504})
    assert response.status_code == 202, response.json
    assert rabbitmq.queues(name)[dispatch.NOTIFICATIONS] == (1, 0)
    assert sum(queue_lengths(redis_url).values()) == 0  # nothing went to Redis
    ready = client.get("/readyz")
    assert ready.status_code == 200 and ready.json["checks"] == {"postgres": "ok", "redis": "ok", "rabbitmq": "ok"}
    text = client.get("/metrics").get_data(as_text=True)
    assert 'relay_queue_messages{queue="notifications"} 1.0' in text
    assert 'relay_queue_messages{queue="grants"} 0.0' in text
    assert 'relay_metrics_source_up{source="broker"} 1.0' in text
    assert "relay_queue_unacked_messages" not in text  # RabbitMQ does not tell it over AMQP

    # the broker drops every connection (as on a restart): readiness and the gauges reconnect at once
    rabbitmq.ctl("close_all_connections", "-p", name, "test")
    assert client.get("/readyz").status_code == 200
    assert 'relay_queue_messages{queue="notifications"} 1.0' in client.get("/metrics").get_data(as_text=True)
    # the listener's publish fails at most once on its dropped connection (the sweeper enqueues that row)
    results = [client.post(URL, json={"EventTypeID": 2, "TimeStamp": f"2026-11-27 23:0{i}:00"}).status_code
               for i in range(3)]
    assert results == [202, 202, 202]
    poll(lambda: rabbitmq.queues(name)[dispatch.NOTIFICATIONS][0] >= 3, 10, 0.2, "the later publishes")


def test_readyz_names_rabbitmq_when_it_is_down(database_url, redis_url, db):
    from cli.embedded import free_port
    from web.app import create_app

    dead = f"amqp://guest:guest@127.0.0.1:{free_port()}//"
    client = create_app(make_settings(DATABASE_URL=database_url, REDIS_URL=redis_url, BROKER_URL=dead)).test_client()
    response = client.get("/readyz")
    assert response.status_code == 503
    assert response.json["error"] == "rabbitmq is unreachable" and response.json["checks"]["redis"] == "ok"
    text = client.get("/metrics").get_data(as_text=True)
    assert 'relay_metrics_source_up{source="broker"} 0.0' in text
