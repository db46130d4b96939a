"""BROKER_URL: Celery's broker, Redis (the default, REDIS_URL) or RabbitMQ; Redis keeps the rate limiter."""
from __future__ import annotations

import pytest

from shared import broker
from shared.settings import Settings, SettingsError

GOOD = {"DATABASE_URL": "postgresql://u@h/db", "REDIS_URL": "redis://h:6379/0",
        "RELAY_LISTENER_TOKENS": "a" * 20}
AMQP = "amqp://relay:secret@rabbit:5672/relay"


def test_broker_url_defaults_to_redis_url():
    s = Settings.from_env(GOOD)
    assert s.broker_url is None and s.celery_broker_url == GOOD["REDIS_URL"]
    config = broker.celery_config(s)
    assert config["broker_url"] == GOOD["REDIS_URL"]
    assert config["broker_transport_options"]["visibility_timeout"] == s.visibility_timeout
    assert "confirm_publish" not in config["broker_transport_options"]
    assert isinstance(broker.direct_publisher(s), broker.DirectRedisPublisher)
    assert broker.create_app(s, publisher=True).conf.broker_transport == "shared.transport:Transport"
    worker_app = broker.create_app(s)  # workers and beat: acks that free their slot whatever Redis answers
    assert worker_app.conf.broker_transport == "shared.transport:WorkerTransport"
    from shared.transport import WorkerTransport
    assert isinstance(worker_app.connection_for_read().transport, WorkerTransport)
    assert broker.amqp_probe(s.celery_broker_url) is None


def test_amqp_broker_uses_celerys_publish_and_amqp_options():
    s = Settings.from_env({**GOOD, "BROKER_URL": AMQP})
    assert s.celery_broker_url == AMQP and s.redis_url == GOOD["REDIS_URL"]  # Redis keeps the rate limiter
    config = broker.celery_config(s)
    assert config["broker_url"] == AMQP
    assert config["broker_transport_options"] == {"confirm_publish": True}  # no Redis-only options
    assert config["broker_heartbeat"] > 0
    assert config["task_acks_late"] and config["task_reject_on_worker_lost"]
    assert broker.direct_publisher(s) is None  # the listener publishes through Celery
    app = broker.create_app(s, publisher=True)
    assert app.conf.broker_transport is None and app.conf.broker_url == AMQP
    assert broker.create_app(s).conf.broker_url == AMQP and broker.create_app(s).conf.broker_transport is None  # workers, beat, flower and the CLI
    probe = broker.amqp_probe(AMQP)
    assert isinstance(probe, broker.AmqpProbe) and broker.amqp_probe(AMQP) is probe  # one per URL, no I/O yet


def test_another_redis_as_broker():
    s = Settings.from_env({**GOOD, "BROKER_URL": "redis://other:6379/1"})
    assert broker.celery_config(s)["broker_url"] == "redis://other:6379/1"
    assert isinstance(broker.direct_publisher(s), broker.DirectRedisPublisher)


@pytest.mark.parametrize("value", ["mysql://x/y", "nonsense"])
def test_malformed_broker_url_is_named(value):
    with pytest.raises(SettingsError, match="BROKER_URL: expected a URL starting with redis://"):
        Settings.from_env({**GOOD, "BROKER_URL": value})


def test_broker_url_round_trips_and_is_left_out_when_unset():
    s = Settings.from_env({**GOOD, "BROKER_URL": AMQP})
    assert s.to_env()["BROKER_URL"] == AMQP and Settings.from_env(s.to_env()) == s
    assert "BROKER_URL" not in Settings.from_env(GOOD).to_env()


def test_amqp_probe_of_an_unreachable_broker_raises_within_its_timeout():
    import socket
    import time

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # closed again: nothing listens there
    probe = broker.AmqpProbe(f"amqp://guest:guest@127.0.0.1:{port}//", timeout=1.0)
    started = time.monotonic()
    with pytest.raises(Exception):
        probe.ping()
    with pytest.raises(Exception):
        probe.queue_depths()
    assert time.monotonic() - started < 5
