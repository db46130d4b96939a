"""The inbox: process one notification by its event type, and sweep unfinished work back to the queue."""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, Callable

from shared import dispatch, repository as repo
from shared.db import DatabaseUnavailable, unit_of_work
from shared.dispatch import Enqueue
from shared.logs import log_context
from shared.optimove.client import backoff

log = logging.getLogger(__name__)


@dataclass
class Outcome:
    """What a handler made of a notification: final status, a reason, and work to enqueue after commit."""

    status: str
    reason: str | None = None
    follow_ups: list[Enqueue] = field(default_factory=list)


Handler = Callable[[Any, Any, dict], Outcome]
HANDLERS: dict[int, Handler] = {}


def handles(*event_types: int) -> Callable[[Handler], Handler]:
    """Register a handler for event types; it runs inside the notification's transaction."""
    def register(fn: Handler) -> Handler:
        for event_type in event_types:
            HANDLERS[event_type] = fn
        return fn
    return register


def process_notification(rt, notification_id: int) -> list[Enqueue]:
    """Run the handler of one notification once; repeats and finished rows do nothing."""
    with log_context(notification_id=notification_id):
        try:
            with unit_of_work(rt.engine) as conn:
                row = repo.start_notification(conn, notification_id)
                if row is None:
                    return []
                with log_context(campaign_id=row["campaign_id"]):
                    if row["attempts"] > rt.settings.max_attempts:
                        reason = f"gave up after {row['attempts'] - 1} attempts"
                        repo.finish_notification(conn, notification_id, "failed", reason)
                        log.error("notification parked: %s", reason)
                        return []
                    handler = HANDLERS.get(row["event_type"])
                    if handler is None:
                        outcome = Outcome("ignored", f"no flow handles EventTypeID {row['event_type']} yet")
                    else:
                        outcome = handler(rt, conn, row)
                    repo.finish_notification(conn, notification_id, outcome.status, outcome.reason)
                    log.info("notification %s: %s%s", notification_id, outcome.status,
                             f" ({outcome.reason})" if outcome.reason else "")
                    return outcome.follow_ups
        except DatabaseUnavailable:
            raise
        except Exception as exc:
            log.exception("notification %s failed; will retry", notification_id)
            with unit_of_work(rt.engine) as conn:
                repo.note_notification_error(conn, notification_id, f"{type(exc).__name__}: {exc}")
                row = repo.get_notification(conn, notification_id)
            return [dispatch.process_notification(notification_id, row["event_type"],
                                                  countdown=backoff(row["attempts"], cap=30))]


def sweep(rt) -> list[Enqueue]:
    """Re-drive work Postgres says is unfinished but nobody touched for `RELAY_SWEEP_AFTER` seconds."""
    age = rt.settings.sweep_after_seconds
    out: list[Enqueue] = []
    with unit_of_work(rt.engine) as conn:
        for row in repo.claim_stale_notifications(conn, age):
            out.append(dispatch.process_notification(row["id"], row["event_type"]))
        for run in repo.claim_stale_runs(conn, age):
            if not run["fetch_done"]:
                out.append(dispatch.fetch_page(run["id"]))
            else:
                repo.finish_run_if_complete(conn, run["id"])
        stale_grants = repo.claim_stale_grants(conn, age)
    out.extend(dispatch.grant_batches(stale_grants, rt.settings.bonus_batch_size))
    if out:
        log.warning("sweeper re-drives %d task(s)", len(out))
    return out
