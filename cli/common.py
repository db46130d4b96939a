"""What the `relay` subcommands share: settings loaded or a clear exit."""
from __future__ import annotations

import sys

import click

from shared.settings import Settings, SettingsError


def load_settings(*required: str) -> Settings:
    """Settings from the environment, or exit 2 with a message naming every bad variable."""
    try:
        return Settings.from_env().require(*required)
    except SettingsError as exc:
        click.echo(f"relay: {exc}", err=True)
        sys.exit(2)


def celery_app():
    """The worker's Celery app and its settings (needs `DATABASE_URL` and `REDIS_URL`)."""
    from workers.app import create_celery

    settings = load_settings("database_url", "redis_url")
    return create_celery(settings), settings
