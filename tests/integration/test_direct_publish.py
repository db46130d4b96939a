"""The listener's direct publish writes the message Celery itself writes for the same task.

Both go into the same real Redis; the two messages must match field by field except the fields
that are unique per message (ids, delivery tag, reply-to, origin). A Celery or kombu upgrade that
changes the format fails here, before a worker sees a message it cannot read.
"""
from __future__ import annotations

import base64
import json

import pytest
import redis

from shared import broker, dispatch

pytestmark = pytest.mark.integration

PER_MESSAGE = {"id", "root_id", "correlation_id", "reply_to", "delivery_tag", "origin"}


def _strip(message: dict) -> dict:
    out = {k: v for k, v in message.items() if k not in ("headers", "properties", "body")}
    out["headers"] = {k: v for k, v in message["headers"].items() if k not in PER_MESSAGE}
    out["properties"] = {k: v for k, v in message["properties"].items() if k not in PER_MESSAGE}
    out["body"] = json.loads(base64.b64decode(message["body"]))
    return out


@pytest.mark.parametrize("event_type", [13, 11])
def test_direct_message_equals_celerys(settings, redis_url, event_type):
    task = dispatch.process_notification(4242, event_type)
    client = redis.Redis.from_url(redis_url)
    broker.publish(broker.create_app(settings, publisher=True), [task], retry=False)
    by_celery = json.loads(client.rpop(task.queue))
    broker.direct_publisher(settings).publish(task)
    direct = json.loads(client.rpop(task.queue))
    assert client.llen(task.queue) == 0
    assert _strip(direct) == _strip(by_celery)
    assert direct["headers"]["id"] == direct["headers"]["root_id"] == direct["properties"]["correlation_id"]
    assert set(direct["headers"]) == set(by_celery["headers"])
    assert set(direct["properties"]) == set(by_celery["properties"])


def test_a_countdown_is_refused(settings):
    with pytest.raises(ValueError, match="countdown"):
        broker.direct_publisher(settings).publish(dispatch.process_notification(1, 13, countdown=5))
