"""`GET /metrics` in Prometheus text format.

Three kinds of series:

- the web's own (listener latency and responses), per process, added up across gunicorn workers
  through prometheus-client's multiprocess mode when `PROMETHEUS_MULTIPROC_DIR` is set (`relay web`
  sets it);
- whatever `shared/metrics.py` counted in this process (in a worker that is the work itself; each
  `relay worker` serves those on its own port, `RELAY_WORKER_METRICS_PORT`);
- gauges read at scrape time from the stores, each bounded so a scrape stays cheap however large the
  ledgers grow (no full-table count): queue depth per Celery queue (Redis `LLEN`; with RabbitMQ
  the ready messages, by a passive `queue.declare` on one kept connection), messages reserved by
  workers (`HLEN unacked`; Redis only), the unfinished notifications (`received`, `processing`,
  through their partial index, at most `BACKLOG_CAP` rows), running runs (partial index), runs
  that ended in the last hour among the newest `RECENT_RUNS` runs (primary-key range), and each
  table's row count as Postgres' statistics estimate it (no table read). Finished notifications
  are counted by the workers (`relay_notifications_processed_total`), not read from the inbox.
"""
from __future__ import annotations

import logging
import os

from flask import Blueprint, Flask, Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily

from shared import repository as repo
from shared.broker import AmqpProbe, amqp_probe
from shared.dispatch import QUEUES
from web.context import runtime

log = logging.getLogger(__name__)

LISTENER_LATENCY = Histogram("relay_listener_latency_seconds", "Time to answer POST /optimove/events",
                             buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5))
LISTENER_RESPONSES = Counter("relay_listener_responses", "Listener answers by HTTP status", ["code"])

BACKLOG_CAP = 10_000          # unfinished notifications (and running runs) read per scrape, at most
RECENT_RUNS = 10_000          # runs (newest by id) looked at for the ones that ended lately
RECENT_SECONDS = 3600.0
STATEMENT_TIMEOUT_MS = 2000   # a scrape never waits long on a busy database
TABLES = ("notifications", "campaign_runs", "grants", "sends", "revokes")
# kombu's Redis transport: a list per queue and priority step (priority 0 is the bare name), and one hash of
# the messages delivered to workers but not acknowledged yet (reserved, including countdowns)
PRIORITY_SEPARATOR = "\x06\x16"
PRIORITY_STEPS = (3, 6, 9)
UNACKED = "unacked"

bp = Blueprint("metrics", __name__)


def queue_keys(queue: str) -> list[str]:
    """The Redis lists of one Celery queue: the queue itself and one per non-zero priority step."""
    return [queue] + [f"{queue}{PRIORITY_SEPARATOR}{step}" for step in PRIORITY_STEPS]


def queue_depths(client, queues=QUEUES) -> tuple[dict[str, int], int]:
    """(messages waiting per queue, messages reserved by workers) in one pipelined round trip."""
    pipe = client.pipeline(transaction=False)
    for queue in queues:
        for key in queue_keys(queue):
            pipe.llen(key)
    pipe.hlen(UNACKED)
    replies = pipe.execute()
    steps = 1 + len(PRIORITY_STEPS)
    depths = {queue: sum(replies[i * steps:(i + 1) * steps]) for i, queue in enumerate(queues)}
    return depths, replies[-1]


class StoreCollector:
    """The scrape-time gauges of Postgres (`engine`) and the broker (`broker`, a Redis client, an `AmqpProbe`
    or None)."""

    def __init__(self, engine, broker):
        self.engine = engine
        self.broker = broker

    def describe(self):
        return []  # registering must not run the queries

    def collect(self):
        up = GaugeMetricFamily("relay_metrics_source_up", "Whether this scrape could read the source "
                               "(postgres, broker)", labels=["source"])
        postgres = list(self._postgres())
        up.add_metric(["postgres"], 1 if postgres else 0)
        yield from postgres
        if self.broker is not None:
            broker = list(self._broker())
            up.add_metric(["broker"], 1 if broker else 0)
            yield from broker
        yield up

    def _postgres(self):
        try:
            with self.engine.connect() as conn:
                conn.exec_driver_sql(f"SET LOCAL statement_timeout = {STATEMENT_TIMEOUT_MS}")
                unfinished = repo.unfinished_notification_counts(conn, BACKLOG_CAP)
                running = repo.running_run_counts(conn, BACKLOG_CAP)
                ended = repo.recently_ended_run_counts(conn, RECENT_RUNS, RECENT_SECONDS)
                rows = repo.estimated_rows(conn, TABLES)
                conn.rollback()
        except Exception as exc:
            log.warning("metrics: postgres gauges unavailable (%s)", type(exc).__name__)
            return
        notifications = GaugeMetricFamily(
            "relay_notifications", "Notifications not finished yet (received, processing) by event type and "
            f"status, read through their index (at most {BACKLOG_CAP}); finished ones are counted by the workers "
            "as relay_notifications_processed_total", labels=["event_type", "status"])
        for event_type, status, n in unfinished:
            notifications.add_metric([str(event_type), status], n)
        yield notifications
        yield GaugeMetricFamily("relay_notifications_backlog_truncated",
                                f"1 when the unfinished notifications reached {BACKLOG_CAP} and were counted no "
                                "further", value=1 if sum(n for _, _, n in unfinished) >= BACKLOG_CAP else 0)
        runs = GaugeMetricFamily("relay_runs", f"Runs in progress by flow (at most {BACKLOG_CAP} counted)",
                                 labels=["flow", "status"])
        for flow, n in running:
            runs.add_metric([flow, "running"], n)
        yield runs
        recent = GaugeMetricFamily("relay_runs_ended_recently", f"Runs that ended in the last "
                                   f"{RECENT_SECONDS:g} s, among the newest {RECENT_RUNS}, by flow and status",
                                   labels=["flow", "status"])
        for flow, status, n in ended:
            recent.add_metric([flow, status], n)
        yield recent
        tables = GaugeMetricFamily("relay_table_rows_estimated", "Rows per table as Postgres' statistics "
                                   "estimate them (n_live_tup; no table is read)", labels=["table"])
        for table, n in rows.items():
            tables.add_metric([table], n)
        yield tables

    def _broker(self):
        amqp = isinstance(self.broker, AmqpProbe)
        try:  # RabbitMQ reports ready messages only; Redis also the unacknowledged ones
            depths, unacked = (self.broker.queue_depths(QUEUES), None) if amqp else queue_depths(self.broker)
        except Exception as exc:
            log.warning("metrics: broker gauges unavailable (%s)", type(exc).__name__)
            return
        source = ("RabbitMQ's ready messages; the unacknowledged ones are not counted" if amqp
                  else "Redis LLEN, every priority")
        queues = GaugeMetricFamily("relay_queue_messages", f"Messages waiting in each Celery queue ({source})",
                                   labels=["queue"])
        for queue, n in depths.items():
            queues.add_metric([queue], n)
        yield queues
        if unacked is not None:
            yield GaugeMetricFamily("relay_queue_unacked_messages", "Messages delivered to workers and not "
                                    "acknowledged yet (running, reserved, or held for a countdown)", value=unacked)


_brokers: dict[str, object] = {}


def broker_client(redis_url: str | None):
    """A Redis client of this process for the queue gauges, with short timeouts; None when the broker is not
    Redis (the gauges are then left out)."""
    if not redis_url or not redis_url.startswith(("redis://", "rediss://", "unix://")):
        return None
    client = _brokers.get(redis_url)
    if client is None:
        import redis

        client = _brokers[redis_url] = redis.Redis.from_url(redis_url, socket_timeout=1, socket_connect_timeout=1)
    return client


@bp.get("/metrics")
def metrics():
    """Prometheus exposition: this process's (or, under gunicorn, all workers') metrics plus the store gauges."""
    from prometheus_client import REGISTRY

    registry = REGISTRY
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        from prometheus_client import multiprocess

        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)
    rt = runtime()
    stores = CollectorRegistry()
    url = rt.settings.celery_broker_url
    stores.register(StoreCollector(rt.engine, broker_client(url) or amqp_probe(url)))
    return Response(generate_latest(registry) + generate_latest(stores), mimetype=CONTENT_TYPE_LATEST)


def init_app(app: Flask) -> None:
    """Register `/metrics`."""
    app.register_blueprint(bp)
