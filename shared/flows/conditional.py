"""Flow 4 — conditional execution (EventTypeID 5).

1. Optimove holds campaign C until `ClearanceRequiredBy` and asks (EventTypeID 5, no channel)
   which of its customers may receive it.
2. We page through GetProcessedCampaignCustomers(CampaignID=C), as long as the deadline leaves
   time to report.
3. Each (customer, promo code) is claimed in the grant ledger with the campaign's key (`source`
   `conditional`), so a later EventTypeID 13 of C grants nobody twice.
4. The claimed codes are granted through the bonus adapter, never once the deadline is too close
   for a bonus call to finish before it (they expire instead).
5. Each customer's outcome (true when every code was granted) is reported with
   UpdateCustomerPromotionStatus, at most 10,000 per call, as results come in; reports take the
   next free rate-limit slot before page fetches. Unreported customers count as false, so a run
   parked `failed` (e.g. a page it cannot claim) still reports what it granted, until the deadline.
6. At the deadline the run ends: `done` if everything was fetched, settled and reported, else
   `deadline_missed` with its counts.
"""
from __future__ import annotations

import logging
from datetime import datetime
from zoneinfo import ZoneInfo

from marshmallow import ValidationError

from shared import dispatch, metrics, repository as repo
from shared.db import unit_of_work
from shared.dispatch import Enqueue
from shared.flows import grants, paging, runs
from shared.flows.base import Flow, Outcome, Pages
from shared.optimove.client import PermanentError, RateLimited, TemporaryError, Throttled, backoff
from shared.optimove.rows import in_timezone
from shared.schemas import parse_notification

log = logging.getLogger(__name__)

SOURCE = "conditional"
REPORT_AFTER_S = 2.0      # a status waits at most this long (plus a tick) before it is reported
CHUNKS_PER_TASK = 5       # report calls per task before it hands over to a fresh one

PAGES = Pages(
    category="customers",
    function="GetProcessedCampaignCustomers",
    params=lambda run, settings: {"CampaignID": run["campaign_id"]},
    ledger=grants.GRANTS,
    source=SOURCE,
    claims=lambda rows, run, settings: grants.codes_per_customer(rows),
)


def clearance_requested(rt, conn, notification: dict) -> Outcome:
    """Open the run with its deadline and start paging, unless the deadline has already passed."""
    try:  # the listener's schema: every spelling of the key it accepted
        parsed = parse_notification(notification["payload"], notification["event_type"]).clearance_required_by
    except ValidationError as exc:
        parsed, problem = None, exc.messages
    else:
        problem = "missing"
    if parsed is None:
        return Outcome("ignored", f"EventTypeID 5 without a usable ClearanceRequiredBy ({problem})")
    deadline = in_timezone(parsed, rt.settings.optimove_timezone)
    run_id, created = repo.create_run(conn, notification["id"], FLOW.name, notification["campaign_id"], None,
                                      deadline=deadline)
    now = repo.database_now(conn)
    if deadline <= now:
        reason = (f"ClearanceRequiredBy {deadline.isoformat()} had passed when the notification was processed "
                  f"({now.isoformat()}): nothing granted")
        repo.end_run(conn, run_id, "deadline_missed", reason)
        metrics.run_ended(conn, FLOW.name, "deadline_missed", 0.0)  # opened and ended in this transaction
        log.error("run %s: %s", run_id, reason)
        return Outcome("done", reason)
    return Outcome("done", follow_ups=[dispatch.fetch_page(run_id)] if created else [])


FLOW = Flow(name="conditional", title="flow 4, conditional execution", start=clearance_requested, pages=PAGES)


def optimove_timestamp(now: datetime, timezone: str) -> str:
    """`now` as Optimove writes times: `YYYY-MM-DD HH:MM:SS` in `OPTIMOVE_TIMEZONE`."""
    return now.astimezone(ZoneInfo(timezone)).strftime("%Y-%m-%d %H:%M:%S")


def report_statuses(rt, run_id: int) -> list[Enqueue]:
    """Report the run's unreported customer statuses, 10,000 per call, while its deadline is ahead.

    The rows of a call stay locked (`FOR UPDATE SKIP LOCKED`) until the call has answered, so two
    report tasks never send the same customers; a failed call leaves them unreported for the next.
    """
    for _ in range(CHUNKS_PER_TASK):
        try:
            with unit_of_work(rt.engine) as conn:
                run = repo.get_run(conn, run_id)
                # a parked (`failed`) run still reports what it granted: unreported counts as false
                if run is None or run["status"] not in repo.REPORTING_STATUSES or run["deadline"] is None:
                    return []
                now = repo.database_now(conn)
                if run["deadline"] <= now:
                    return []  # Optimove has scheduled the campaign: a late report changes nothing
                statuses = repo.unreported_statuses(conn, run_id, runs.REPORT_CHUNK)
                if not statuses:
                    return runs.finish(rt, conn, run_id) if run["status"] == "running" else []
                rt.optimove.post("integrations", "UpdateCustomerPromotionStatus", {
                    "TimeStamp": optimove_timestamp(now, rt.settings.optimove_timezone),
                    "CampaignID": run["campaign_id"],
                    "PromosUpdated": [{"CustomerID": c, "Status": s} for c, s in statuses]}, priority=True)
                repo.mark_reported(conn, run_id, statuses)
            log.info("run %s: reported %d customer status(es) (%d true)", run_id, len(statuses),
                     sum(1 for _, s in statuses if s))
        except (RateLimited, Throttled) as exc:
            return [dispatch.report_statuses(run_id, countdown=min(exc.retry_after or 1.0, 5.0))]
        except TemporaryError as exc:
            log.warning("status report of run %s failed (%s); retrying", run_id, exc)
            return [dispatch.report_statuses(run_id, countdown=backoff(2, cap=5))]
        except PermanentError as exc:
            log.error("status report of run %s refused: %s", run_id, exc)
            with unit_of_work(rt.engine) as conn:
                repo.touch_run(conn, run_id, error=f"UpdateCustomerPromotionStatus: {exc}")
            return []
    return [dispatch.report_statuses(run_id)]


def tick(rt) -> list[Enqueue]:
    """Beat's frequent job for runs with a deadline: end the overdue ones, and report statuses that waited."""
    with unit_of_work(rt.engine) as conn:
        for run in repo.close_overdue_runs(conn):
            metrics.run_row_ended(conn, run)
            unreported = repo.unreported_count(conn, run["id"])
            log.log(logging.INFO if run["status"] == "done" else logging.ERROR,
                    "run %s (campaign %s) %s at its deadline: fetched %d, claimed %d, granted %d, rejected %d, "
                    "failed %d, expired %d, reported true %d, false %d, unreported %d",
                    run["id"], run["campaign_id"], run["status"], run["fetched"], run["claimed"], run["granted"],
                    run["rejected"], run["failed"], run["expired"], run["reported_true"], run["reported_false"],
                    unreported)
        due = repo.runs_to_report(conn, REPORT_AFTER_S, runs.REPORT_CHUNK)
    return [dispatch.report_statuses(run_id) for run_id in due]
