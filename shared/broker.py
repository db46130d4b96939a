"""The Celery app's settings and publishing, shared by both entry points (web publishes, workers consume).

Built from the same settings everywhere (reliability-notes.md): late acks, requeue on a lost
worker, one exchange per queue, and every countdown well under the visibility timeout.

The broker is `BROKER_URL` (default `REDIS_URL`): Redis or RabbitMQ (amqp://). Redis always
holds the Optimove rate limiter. With RabbitMQ a message a worker took but did not acknowledge
goes back to its queue as soon as that worker's connection closes (a SIGKILLed worker included),
not after a visibility timeout; countdowns are held unacknowledged by the worker, which RabbitMQ
allows for `consumer_timeout` (30 min by default): the relay's countdowns are minutes at most
(Optimove's Retry-After is capped at 300 s) and its tasks end within `task_time_limit`
(`RELAY_VISIBILITY_TIMEOUT` / 2, 900 s by default).
"""
from __future__ import annotations

import base64
import json
import os
import re
import threading
import uuid

from celery import Celery
from kombu import Exchange, Queue

from shared import dispatch
from shared.settings import Settings

REDIS_SCHEMES = ("redis://", "rediss://", "unix://")
AMQP_SCHEMES = ("amqp://", "amqps://", "pyamqp://")


def is_redis_url(url: str | None) -> bool:
    """Whether `url` names a Redis server (kombu's Redis transport)."""
    return bool(url) and url.startswith(REDIS_SCHEMES)


def is_amqp_url(url: str | None) -> bool:
    """Whether `url` names an AMQP broker (RabbitMQ)."""
    return bool(url) and url.startswith(AMQP_SCHEMES)


def transport_config(url: str | None, visibility_timeout: int) -> dict:
    """The broker-specific Celery settings: Redis' visibility timeout and socket timeouts, or RabbitMQ's
    publisher confirms and heartbeat."""
    if is_amqp_url(url):
        return {
            # a publish returns once RabbitMQ has taken the message (as an LPUSH answers once Redis has it)
            "broker_transport_options": {"confirm_publish": True},
            # the worker's consumer connection: a dead broker or connection is noticed within two beats
            # (a solo-pool worker beats only between tasks: RabbitMQ waits 240 s, far past a real-time task)
            "broker_heartbeat": 120,
            "broker_connection_timeout": 4,
        }
    return {
        "broker_transport_options": {
            "visibility_timeout": visibility_timeout,
            "socket_connect_timeout": 3,
            "socket_timeout": 10,
            "retry_on_timeout": True,
        },
    }


def celery_config(settings: Settings) -> dict:
    """Celery settings that keep acknowledged work from being lost or run twice in parallel."""
    url = settings.celery_broker_url
    return {
        "broker_url": url,
        "broker_connection_retry_on_startup": True,
        **transport_config(url, settings.visibility_timeout),
        "task_acks_late": True,
        "task_reject_on_worker_lost": True,
        "worker_cancel_long_running_tasks_on_connection_loss": True,
        "worker_prefetch_multiplier": 1,
        "task_ignore_result": True,
        "result_backend": None,
        "task_default_queue": dispatch.NOTIFICATIONS,
        # one exchange per queue: with one shared exchange and routing key every bound queue gets a copy
        "task_queues": [Queue(name, Exchange(name, type="direct"), routing_key=name) for name in dispatch.QUEUES],
        "task_default_exchange": dispatch.NOTIFICATIONS,
        "task_default_routing_key": dispatch.NOTIFICATIONS,
        "task_publish_retry_policy": {"max_retries": 2, "interval_start": 0, "interval_step": 0.2,
                                      "interval_max": 0.5},
        "task_time_limit": max(60, settings.visibility_timeout // 2),
        "task_soft_time_limit": max(50, settings.visibility_timeout // 2 - 10),
        "worker_hijack_root_logger": False,
        "beat_schedule": {
            "sweep": {"task": dispatch.SWEEP, "schedule": settings.sweep_interval_seconds,
                      "options": {"queue": dispatch.sweep().queue, "expires": settings.sweep_interval_seconds}},
            "deactivate": {"task": dispatch.DEACTIVATE, "schedule": 3600.0,
                           "options": {"queue": dispatch.deactivate().queue, "expires": 3600.0}},
            "release-due": {"task": dispatch.RELEASE_DUE, "schedule": settings.release_interval_seconds,
                            "options": {"queue": dispatch.release_due().queue,
                                        "expires": settings.release_interval_seconds}},
        },
        "timezone": "UTC",
    }


def create_app(settings: Settings, publisher: bool = False) -> Celery:
    """A Celery app for `settings` (no tasks registered).

    `publisher=True` (the web process, which only publishes) uses, when the broker is Redis, the
    Redis transport that keeps its client between publishes; otherwise (workers, beat) the Redis
    transport whose acks free the worker's prefetch slot even when Redis fails (`shared.transport`).
    """
    app = Celery("relay", set_as_current=True)
    app.conf.update(celery_config(settings))
    if is_redis_url(settings.celery_broker_url):
        # web: a kept client per channel; workers: acks that always free their prefetch slot
        app.conf.broker_transport = "shared.transport:Transport" if publisher else "shared.transport:WorkerTransport"
    return app


def publish(app: Celery, items: list[dispatch.Enqueue], retry: bool = True) -> None:
    """Send tasks (after the domain call has committed) on one pooled producer.

    With `retry=False` (the listener) a broker outage fails at once instead of holding the request;
    the sweeper enqueues the committed row later.
    """
    if not items:
        return
    with app.producer_pool.acquire(block=True, timeout=10) as producer:
        for item in items:
            app.send_task(item.task, args=item.args, queue=item.queue, countdown=item.countdown,
                          producer=producer, retry=retry, argsrepr=repr(item.args), kwargsrepr="{}")


class DirectRedisPublisher:
    """The listener's publish: the Celery (protocol 2) message kombu's Redis transport would write,
    built here and pushed with one LPUSH on a connection this thread keeps.

    `send_task` costs about 0.33 ms of CPU per call (routing, option merging, the producer, kombu's
    virtual exchange lookup); redis-py's `lpush` about 0.09 ms (pool checkout, health check, retry
    wrapper); an LPUSH on a kept connection about 0.03 ms. The message is the one Celery builds for
    `send_task(name, args, queue=q)` with no countdown (the list named after the queue, exchange "",
    routing key = queue, priority 0), rendered from a template made once per task name and queue;
    `tests/integration/test_direct_publish.py` checks it against Celery's own, field by field, so an
    upgrade that changes the format fails a test. Anything else (a countdown, another broker) goes
    through `publish`.
    """

    _ID, _REPLY, _TAG, _BODY, _ARGS = (f"\x00{name}\x00" for name in ("id", "reply", "tag", "body", "args"))

    def __init__(self, redis_url: str):
        import socket

        import redis

        pool = redis.ConnectionPool.from_url(redis_url, socket_timeout=10, socket_connect_timeout=3)
        self._connection_class, self._connection_kwargs = pool.connection_class, pool.connection_kwargs
        self._origin = f"gen{os.getpid()}@{socket.gethostname()}"
        self._templates: dict[tuple[str, str], list[str]] = {}
        self._local = threading.local()
        os.register_at_fork(after_in_child=self._forget)

    def _forget(self) -> None:
        self._local = threading.local()  # a forked child opens its own connection

    def _template(self, task: str, queue: str) -> list[str]:
        """The message as JSON text split at its per-message fields (ids, body, argsrepr)."""
        key = (task, queue)
        if key not in self._templates:
            message = {
                "body": self._BODY, "content-encoding": "utf-8", "content-type": "application/json",
                "headers": {"lang": "py", "task": task, "id": self._ID, "shadow": None, "eta": None,
                            "expires": None, "group": None, "group_index": None, "retries": 0,
                            "timelimit": [None, None], "root_id": self._ID, "parent_id": None,
                            "argsrepr": self._ARGS, "kwargsrepr": "{}", "origin": self._origin,
                            "ignore_result": None, "replaced_task_nesting": 0, "stamped_headers": None,
                            "stamps": {}},
                "properties": {"correlation_id": self._ID, "reply_to": self._REPLY, "argsrepr": self._ARGS,
                               "kwargsrepr": "{}", "delivery_mode": 2,
                               "delivery_info": {"exchange": "", "routing_key": queue}, "priority": 0,
                               "body_encoding": "base64", "delivery_tag": self._TAG},
            }
            text = json.dumps(message)
            for marker in (self._ID, self._REPLY, self._TAG, self._BODY, self._ARGS):
                text = text.replace(json.dumps(marker)[1:-1], marker)
            self._templates[key] = re.split("(\x00[a-z]+\x00)", text)
        return self._templates[key]

    def message(self, item: dispatch.Enqueue) -> str:
        """The JSON text of the task message for `item`."""
        task_id = str(uuid.uuid4())
        body = base64.b64encode(json.dumps(
            [list(item.args), {}, {"callbacks": None, "errbacks": None, "chain": None, "chord": None}]).encode())
        values = {self._ID: task_id, self._REPLY: str(uuid.uuid4()), self._TAG: str(uuid.uuid4()),
                  self._BODY: body.decode(), self._ARGS: json.dumps(repr(item.args))[1:-1]}
        return "".join(values.get(part, part) for part in self._template(item.task, item.queue))

    def publish(self, item: dispatch.Enqueue) -> None:
        """Push one task message; raises redis' errors (the caller decides what a failure means).

        No retry inside the request (as `publish(retry=False)`): the sweeper enqueues a row that missed.
        """
        if item.countdown:
            raise ValueError("a countdown needs Celery's publish")
        payload = self.message(item)
        connection = getattr(self._local, "connection", None)
        if connection is None:
            connection = self._local.connection = self._connection_class(**self._connection_kwargs)
        try:
            connection.send_packed_command(connection.pack_command("LPUSH", item.queue, payload), check_health=False)
            connection.read_response()
        except BaseException:
            self._local.connection = None
            connection.disconnect()
            raise


def direct_publisher(settings: Settings) -> DirectRedisPublisher | None:
    """The direct publisher when the broker is Redis, else None (publish through Celery)."""
    url = settings.celery_broker_url
    return DirectRedisPublisher(url) if is_redis_url(url) else None


class AmqpProbe:
    """One kept AMQP connection of this process for `/readyz` and the queue-depth gauges.

    A call costs a few round trips on that connection (no connection per call, no message touched);
    every connect, read and write gives up after `timeout` seconds. A call that fails drops the
    connection and tries once more on a new one, so a broker restart since the last call is no alarm.
    """

    def __init__(self, url: str, timeout: float = 2.0):
        self.url = url
        self.timeout = timeout
        self._lock = threading.Lock()  # gthread workers: one caller at a time on the connection
        self._conn = None

    def _connection(self):
        if self._conn is None:
            from kombu import Connection

            conn = Connection(self.url, connect_timeout=self.timeout, heartbeat=0,
                              transport_options={"read_timeout": self.timeout, "write_timeout": self.timeout})
            conn.ensure_connection(max_retries=0)  # one attempt (`connect()` tries again after 2 s)
            self._conn = conn
        return self._conn.connection

    def _drop(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            try:
                conn.collect()  # release the socket without a close handshake on a dead connection
            except Exception:
                pass

    def _call(self, fn):
        with self._lock:
            kept = self._conn is not None
            try:
                return fn(self._connection())
            except Exception:
                self._drop()
                if not kept:
                    raise
            return fn(self._connection())  # the kept connection had died: once more on a new one

    def ping(self) -> None:
        """A round trip to the broker (a channel opened and closed); raises when it is unreachable."""
        self._call(lambda conn: conn.channel().close())

    def queue_depths(self, queues=dispatch.QUEUES) -> dict[str, int]:
        """Messages ready in each queue (passive queue.declare: RabbitMQ does not count the unacknowledged
        ones here); 0 for a queue no worker has declared yet."""
        def read(conn):
            from amqp.exceptions import NotFound

            depths = {}
            channel = conn.channel()
            for queue in queues:
                try:
                    depths[queue] = channel.queue_declare(queue, passive=True).message_count
                except NotFound:  # the broker closed the channel
                    depths[queue] = 0
                    channel = conn.channel()
            channel.close()
            return depths
        return self._call(read)


_probes: dict[str, AmqpProbe] = {}
os.register_at_fork(after_in_child=_probes.clear)  # a forked child opens its own connection


def amqp_probe(url: str | None) -> AmqpProbe | None:
    """This process's probe of the AMQP broker at `url`; None when `url` is not AMQP."""
    if not is_amqp_url(url):
        return None
    probe = _probes.get(url)
    if probe is None:
        probe = _probes[url] = AmqpProbe(url)
    return probe
