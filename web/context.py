"""The current app's per-process resources, for the blueprints (no import of the app factory)."""
from __future__ import annotations

from flask import current_app

from shared.runtime import Runtime


def runtime() -> Runtime:
    """The Runtime of the current app."""
    return current_app.extensions["relay"]


def celery():
    """The Celery app the web process publishes with."""
    return current_app.extensions["celery"]
