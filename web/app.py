"""The web process: one `create_app` factory; each part registers itself with `init_app`."""
from __future__ import annotations

from flask import Flask
from werkzeug.routing import IntegerConverter

from shared import broker
from shared.logs import configure_for as configure_logging
from shared.db import KeptConnections
from shared.runtime import Runtime
from shared.schemas import BIGINT_MAX
from shared.settings import Settings
from web import admin, api, errors, health, listener, metrics, openapi


class IdConverter(IntegerConverter):
    """`<id:name>`: a row id, 1 to 2**63-1 (Postgres bigint); anything else is a 404, never a query."""

    def __init__(self, url_map):
        super().__init__(url_map, min=1, max=BIGINT_MAX)


def create_app(settings: Settings | None = None, celery=None) -> Flask:
    """Build the Flask app from `settings` (default: the environment) and a Celery app for publishing."""
    settings = settings or Settings.from_env()
    settings.require("database_url", "redis_url")
    configure_logging(settings)  # RELAY_LOG_LEVEL, RELAY_LOG_FORMAT, and the secrets to scrub
    app = Flask("relay")
    app.config["MAX_CONTENT_LENGTH"] = settings.max_body_bytes
    # no pre-ping round trip per request: the listener retries once on a stale pooled connection
    app.extensions["relay"] = Runtime(settings, pre_ping=False)
    # the listener's insert: a connection kept per thread, no pool (it retries once on a stale one too)
    app.extensions["listener_db"] = KeptConnections(settings.database_url)
    app.extensions["celery"] = celery or broker.create_app(settings, publisher=True)
    # the listener's one task per notification goes straight to Redis when Celery is ours and on Redis
    app.extensions["direct_publisher"] = broker.direct_publisher(settings) if celery is None else None
    app.url_map.converters["id"] = IdConverter
    for part in (errors, listener, api, admin, health, metrics, openapi):
        part.init_app(app)
    return app
