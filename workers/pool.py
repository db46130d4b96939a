"""Celery's thread pool, waking the worker's event loop each time a task has finished.

With the Redis transport the worker asks for the next message (BRPOP) only from its event loop,
and only while fewer messages than the prefetch limit are unacknowledged. A task of the thread
pool is acknowledged in its own thread, which does not wake the loop: once every thread was busy,
the loop slept until its next timer (up to a second or more) before fetching again, while
messages waited in Redis. The prefork pool does not have this problem: its results arrive over
pipes the loop watches. `relay worker --pool threads` uses this pool.
"""
from __future__ import annotations

from celery.concurrency import thread


def _nothing() -> None:
    """A callback that only makes the event loop run one more turn."""


class WakingThreadPool(thread.TaskPool):
    """`celery.concurrency.thread.TaskPool` that wakes the event loop after each task's callback (its ack)."""

    _hub = None

    def register_with_event_loop(self, loop) -> None:
        self._hub = loop

    def on_apply(self, target, args=None, kwargs=None, callback=None, accept_callback=None, **rest):
        hub = self._hub

        def done(*result):
            try:
                if callback is not None:
                    callback(*result)
            finally:
                if hub is not None:
                    hub.call_soon(_nothing)

        return super().on_apply(target, args, kwargs, done, accept_callback, **rest)
