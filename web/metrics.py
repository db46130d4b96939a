"""`GET /metrics` in Prometheus text format.

Listener latency and responses are per process, aggregated across gunicorn workers through
prometheus-client's multiprocess mode when `PROMETHEUS_MULTIPROC_DIR` is set (`relay web` sets
it). Notification counts by event type and outcome are read from Postgres, the source of truth,
so they include what the workers did.
"""
from __future__ import annotations

import os

from flask import Blueprint, Flask, Response
from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest, CONTENT_TYPE_LATEST
from prometheus_client.core import GaugeMetricFamily

from shared import repository as repo
from web.context import runtime

LISTENER_LATENCY = Histogram("relay_listener_latency_seconds", "Time to answer POST /optimove/events",
                             buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5))
LISTENER_RESPONSES = Counter("relay_listener_responses", "Listener answers by HTTP status", ["code"])

bp = Blueprint("metrics", __name__)


class InboxCollector:
    """Notifications by event type and status, straight from the inbox table."""

    def __init__(self, engine):
        self.engine = engine

    def collect(self):
        family = GaugeMetricFamily("relay_notifications", "Notifications in the inbox by event type and outcome",
                                   labels=["event_type", "status"])
        try:
            with self.engine.connect() as conn:
                for event_type, status, count in repo.notification_counts(conn):
                    family.add_metric([str(event_type), status], count)
        except Exception:
            pass
        yield family


@bp.get("/metrics")
def metrics():
    """Prometheus exposition: this process's (or, under gunicorn, all workers') metrics plus the inbox."""
    from prometheus_client import REGISTRY

    registry = REGISTRY
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        from prometheus_client import multiprocess

        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)
    inbox = CollectorRegistry()
    inbox.register(InboxCollector(runtime().engine))
    return Response(generate_latest(registry) + generate_latest(inbox), mimetype=CONTENT_TYPE_LATEST)


def init_app(app: Flask) -> None:
    """Register `/metrics`."""
    app.register_blueprint(bp)
