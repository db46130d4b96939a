"""The worker's Celery app: the shared broker settings, the relay's tasks and a Runtime."""
from __future__ import annotations

import logging

from celery import Celery, signals

from shared import broker
from shared.logs import configure_for, resolve_format
from shared.runtime import Runtime
from shared.settings import Settings
from workers import tasks


def create_celery(settings: Settings) -> Celery:
    """A Celery app for `settings` with the relay's tasks registered and a Runtime attached."""
    global _log_settings
    _log_settings = settings  # Celery's setup_logging signal carries no app: its handler reads them here
    app = broker.create_app(settings)
    app.relay_runtime = Runtime(settings, pre_ping=False)  # a stale connection is replayed (tasks._run)
    tasks.register(app)
    return app


_log_settings: Settings | None = None


@signals.setup_logging.connect
def _setup_logging(loglevel=None, **kwargs):
    """Celery's own lines (worker, beat, task trace) in the relay's format (RELAY_LOG_FORMAT)."""
    configure_for(_log_settings, loglevel or None)
    if resolve_format(_log_settings.log_format if _log_settings else None) == "json":
        # the worker prints its shutdown notices ("worker: Warm shutdown") past logging: log them instead
        from celery.apps import worker as celery_worker

        celery_worker.safe_say = _say


@signals.celeryd_init.connect
def _early_logging(**kwargs):
    """The worker warns before it sets up logging (check_privileges): that warning in the format too."""
    _setup_logging()


def _say(msg, f=None):
    logging.getLogger("celery.apps.worker").warning(msg)
