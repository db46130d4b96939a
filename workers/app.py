"""The worker's Celery app: the shared broker settings, the relay's tasks and a Runtime."""
from __future__ import annotations

from celery import Celery, signals

from shared import broker
from shared.logs import configure as configure_logging
from shared.runtime import Runtime
from shared.settings import Settings
from workers import tasks


def create_celery(settings: Settings) -> Celery:
    """A Celery app for `settings` with the relay's tasks registered and a Runtime attached."""
    app = broker.create_app(settings)
    app.relay_runtime = Runtime(settings, pre_ping=False)  # a stale connection is replayed (tasks._run)
    tasks.register(app)
    return app


@signals.setup_logging.connect
def _setup_logging(**kwargs):
    configure_logging()
