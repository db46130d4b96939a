"""Work to enqueue once the current transaction has committed.

Domain functions return `Enqueue` items instead of publishing; the Celery layer publishes them
after commit (enqueue-after-commit, STYLE.md lesson 5). Only ids and plain values cross the queue.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

PROCESS_NOTIFICATION = "relay.process_notification"
FETCH_PAGE = "relay.fetch_page"
GRANT_BATCH = "relay.grant_batch"
SWEEP = "relay.sweep"

QUEUES = ("realtime", "notifications", "campaigns", "grants")


@dataclass(frozen=True)
class Enqueue:
    """A task to publish: name, positional args (plain values), queue and an optional delay."""

    task: str
    args: tuple
    queue: str
    countdown: float | None = None


def process_notification(notification_id: int, event_type: int, countdown: float | None = None) -> Enqueue:
    """The task that processes one inbox row; real-time triggers get their own queue."""
    queue = "realtime" if event_type == 11 else "notifications"
    return Enqueue(PROCESS_NOTIFICATION, (notification_id,), queue, countdown)


def fetch_page(run_id: int, countdown: float | None = None) -> Enqueue:
    """The task that fetches and claims the next page of a run."""
    return Enqueue(FETCH_PAGE, (run_id,), "campaigns", countdown)


def grant_batch(run_id: int | None, grant_ids: list[int], countdown: float | None = None) -> Enqueue:
    """The task that delivers claimed grants to the bonus system."""
    return Enqueue(GRANT_BATCH, (run_id, list(grant_ids)), "grants", countdown)


def grant_batches(grants: Iterable[tuple[int | None, int]], size: int) -> list[Enqueue]:
    """Grant tasks for (run id, grant id) pairs: grouped by run, at most `size` grants each."""
    per_run: dict[int | None, list[int]] = {}
    for run_id, grant_id in grants:
        per_run.setdefault(run_id, []).append(grant_id)
    return [grant_batch(run_id, ids[i:i + size]) for run_id, ids in per_run.items()
            for i in range(0, len(ids), size)]
