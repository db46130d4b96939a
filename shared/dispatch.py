"""Task names, queues, and the work to enqueue once the current transaction has committed.

This is the one place that names the relay's Celery tasks and queues: the task layer
(`workers/tasks.py`), the domain code and the tests all take them from here.

Domain functions return `Enqueue` items instead of publishing; the Celery layer publishes them
after commit (enqueue-after-commit, STYLE.md lesson 5). Only ids and plain values cross the queue.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

REALTIME = "realtime"            # real-time triggers and everything they cause
NOTIFICATIONS = "notifications"  # inbox rows of campaign events, and the sweeper
CAMPAIGNS = "campaigns"          # page fetching
GRANTS = "grants"                # bonus and send calls of campaigns
QUEUES = (REALTIME, NOTIFICATIONS, CAMPAIGNS, GRANTS)
CAMPAIGN_QUEUES = (NOTIFICATIONS, CAMPAIGNS, GRANTS)

PROCESS_NOTIFICATION = "relay.process_notification"
FETCH_PAGE = "relay.fetch_page"
GRANT_BATCH = "relay.grant_batch"
SEND_BATCH = "relay.send_batch"
SWEEP = "relay.sweep"
RELEASE_DUE = "relay.release_due"
REPORT_METRICS = "relay.report_metrics"
REPORT_STATUSES = "relay.report_statuses"
REVOKE_BATCH = "relay.revoke_batch"
DEACTIVATE = "relay.deactivate"
TASKS = (PROCESS_NOTIFICATION, FETCH_PAGE, GRANT_BATCH, SEND_BATCH, SWEEP, RELEASE_DUE, REPORT_METRICS,
         REPORT_STATUSES, REVOKE_BATCH, DEACTIVATE)

REALTIME_EVENT_TYPES = (11,)
REALTIME_SOURCE = "realtime"  # the `source` of real-time ledger rows: their deliveries stay on REALTIME


@dataclass(frozen=True)
class Enqueue:
    """A task to publish: name, positional args (plain values), queue and an optional delay."""

    task: str
    args: tuple
    queue: str
    countdown: float | None = None


def notification_queue(event_type: int) -> str:
    """Real-time triggers have their own queue, never behind a campaign."""
    return REALTIME if event_type in REALTIME_EVENT_TYPES else NOTIFICATIONS


def delivery_queue(source: str) -> str:
    """The queue of a ledger row's delivery: real-time rows stay on `realtime`."""
    return REALTIME if source == REALTIME_SOURCE else GRANTS


def process_notification(notification_id: int, event_type: int, countdown: float | None = None) -> Enqueue:
    """The task that processes one inbox row."""
    return Enqueue(PROCESS_NOTIFICATION, (notification_id,), notification_queue(event_type), countdown)


def fetch_page(run_id: int, countdown: float | None = None) -> Enqueue:
    """The task that fetches and claims the next page of a run."""
    return Enqueue(FETCH_PAGE, (run_id,), CAMPAIGNS, countdown)


def sweep() -> Enqueue:
    """The sweeper (beat schedules it; `relay sweep` runs it once)."""
    return Enqueue(SWEEP, (), NOTIFICATIONS)


def release_due() -> Enqueue:
    """The job that releases timed sends when they are due (beat schedules it every `RELAY_RELEASE_INTERVAL`)."""
    return Enqueue(RELEASE_DUE, (), NOTIFICATIONS)


def report_metrics(run_id: int, attempt: int = 1, countdown: float | None = None) -> Enqueue:
    """The task that reports a finished send run's metrics to Optimove."""
    return Enqueue(REPORT_METRICS, (run_id, attempt), NOTIFICATIONS, countdown)


def report_statuses(run_id: int, countdown: float | None = None) -> Enqueue:
    """The task that reports a conditional run's customer statuses to Optimove (a short task racing a
    deadline: on the notifications queue, not behind campaigns' grant batches)."""
    return Enqueue(REPORT_STATUSES, (run_id,), NOTIFICATIONS, countdown)


def deactivate(countdown: float | None = None) -> Enqueue:
    """The promotion-deactivation job (beat schedules it hourly; it acts once per date)."""
    return Enqueue(DEACTIVATE, (), NOTIFICATIONS, countdown)


def deliveries(task: str, rows: Iterable[tuple[int | None, int, str]], size: int) -> list[Enqueue]:
    """Delivery tasks for (run id, row id, source) triples: grouped by run and queue, `size` rows each."""
    groups: dict[tuple[int | None, str], list[int]] = {}
    for run_id, row_id, source in rows:
        groups.setdefault((run_id, delivery_queue(source)), []).append(row_id)
    return [Enqueue(task, (run_id, ids[i:i + size]), queue)
            for (run_id, queue), ids in groups.items() for i in range(0, len(ids), size)]
