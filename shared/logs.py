"""Logging configured once per process; every line carries task, notification and campaign ids."""
from __future__ import annotations

import contextlib
import contextvars
import logging
from typing import Iterator

_context: contextvars.ContextVar[dict] = contextvars.ContextVar("relay_log_context", default={})

FORMAT = "%(asctime)s %(levelname)s [%(context)s] %(name)s: %(message)s"


@contextlib.contextmanager
def log_context(**ids) -> Iterator[None]:
    """Add ids (task_id, notification_id, campaign_id, run_id) to every log line in the block."""
    token = _context.set({**_context.get(), **{k: v for k, v in ids.items() if v is not None}})
    try:
        yield
    finally:
        _context.reset(token)


class ContextFilter(logging.Filter):
    """Puts the current log context on each record as `%(context)s`."""

    def filter(self, record: logging.LogRecord) -> bool:
        ctx = _context.get()
        record.context = " ".join(f"{k}={v}" for k, v in ctx.items()) or "-"
        return True


def configure(level: str = "info") -> None:
    """Install the relay's format and context filter on the root logger (idempotent)."""
    root = logging.getLogger()
    root.setLevel(level.upper())
    for handler in root.handlers or [logging.StreamHandler()]:
        if not any(isinstance(f, ContextFilter) for f in handler.filters):
            handler.addFilter(ContextFilter())
        handler.setFormatter(logging.Formatter(FORMAT))
        if handler not in root.handlers:
            root.addHandler(handler)
