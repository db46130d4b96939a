"""The inbox: process one notification with the flow its route names."""
from __future__ import annotations

import logging

from shared import dispatch, metrics, repository as repo
from shared.db import DatabaseUnavailable, unit_of_work
from shared.dispatch import Enqueue
from shared.flows.base import Outcome
from shared.flows.routing import ROUTER
from shared.logs import log_context
from shared.optimove.client import backoff

log = logging.getLogger(__name__)


def process_notification(rt, notification_id: int) -> list[Enqueue]:
    """Run the flow of one notification once; repeats and finished rows do nothing.

    The flow runs inside the notification's transaction. What it claimed for delivery at once
    (real-time flows) is delivered right after the commit, in this task.
    """
    with log_context(notification_id=notification_id):
        try:
            outcome = _run_flow(rt, notification_id)
        except DatabaseUnavailable:
            raise
        except Exception as exc:
            log.exception("notification %s failed; will retry", notification_id)
            with unit_of_work(rt.engine) as conn:
                repo.note_notification_error(conn, notification_id, f"{type(exc).__name__}: {exc}")
                row = repo.get_notification(conn, notification_id)
            return [dispatch.process_notification(notification_id, row["event_type"],
                                                  countdown=backoff(row["attempts"], cap=30))]
        if outcome is None:
            return []
        follow_ups = list(outcome.follow_ups)
        for ledger, rows in outcome.deliver_now:
            if rows:
                follow_ups += ledger.deliver_claimed(rt, None, rows)
        return follow_ups


def _run_flow(rt, notification_id: int) -> Outcome | None:
    # The attempt is counted in a transaction of its own, committed before the flow runs: a flow
    # that raises, or a worker that dies in it (a poison notification), rolls back its own work but
    # not the count, so the notification is parked after RELAY_MAX_ATTEMPTS instead of looping.
    with unit_of_work(rt.engine) as conn:
        counted = repo.start_notification(conn, notification_id)
    if counted is None:
        return None
    with unit_of_work(rt.engine) as conn:
        row = repo.lock_unfinished_notification(conn, notification_id)  # one delivery at a time
        if row is None:
            return None
        with log_context(campaign_id=row["campaign_id"]):
            if row["attempts"] > rt.settings.max_attempts:
                # the last error a flow raised, if it raised (a worker that died in it leaves none)
                reason = f"gave up after {row['attempts'] - 1} attempts" + (
                    f": {row['last_error']}" if row["last_error"] else "")
                repo.finish_notification(conn, notification_id, "failed", reason)
                metrics.notification_finished(conn, row["event_type"], "failed")
                log.error("notification parked: %s", reason)
                return None
            route = ROUTER.route(row["event_type"], row["channel_id"], rt.settings)
            flow = ROUTER.flow_for(route)
            outcome = (flow.start(rt, conn, row) if flow is not None
                       else Outcome("ignored", ROUTER.unrouted_reason(route)))
            repo.finish_notification(conn, notification_id, outcome.status, outcome.reason)
            metrics.notification_finished(conn, row["event_type"], outcome.status)
            log.info("notification %s (%s): %s%s", notification_id, flow.name if flow else route, outcome.status,
                     f" ({outcome.reason})" if outcome.reason else "")
            return outcome
