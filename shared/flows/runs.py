"""The end of a campaign run: marked `done` once nothing of it is in flight, then (send runs, when
`OPTIMOVE_REPORT_METRICS` is on) its sends per template reported to Optimove."""
from __future__ import annotations

import logging

from shared import dispatch, metrics, repository as repo
from shared.db import unit_of_work
from shared.dispatch import Enqueue
from shared.optimove.client import PermanentError, TemporaryError, backoff

log = logging.getLogger(__name__)

METRICS_ATTEMPTS = 8


def finish(rt, conn, run_id: int) -> list[Enqueue]:
    """Mark the run `done` if it is complete (inside the caller's transaction); return its metrics report."""
    finished = repo.finish_run_if_complete(conn, run_id)
    if finished is None:
        return []
    metrics.run_row_ended(conn, finished)
    log.info("run %s (%s) %s", run_id, finished["flow"], finished["status"])
    if finished["sent"] and rt.settings.optimove_report_metrics:
        return [dispatch.report_metrics(run_id)]
    return []


def metrics_body(run: dict, per_template: list[tuple[int, int]], metric_id: int) -> list[dict]:
    """The UpdateCampaignMetrics body: one 'sent' metric per template of the run."""
    return [{"ChannelID": run["channel_id"], "CampaignID": run["campaign_id"], "TemplateID": template,
             "MetricID": metric_id, "MetricValue": sent} for template, sent in per_template]


def report_metrics(rt, run_id: int, attempt: int = 1) -> list[Enqueue]:
    """POST UpdateCampaignMetrics for a finished send run, once it is not reported yet.

    A temporary failure (429, 5xx, timeout) is retried with backoff up to METRICS_ATTEMPTS times; a
    permanent one (400, 401, 403, 404) is recorded on the run (`metrics_error`) and not retried.
    """
    if not rt.settings.optimove_report_metrics:
        return []
    with unit_of_work(rt.engine) as conn:
        run = repo.get_run(conn, run_id)
        if run is None or run["status"] != "done" or run["metrics_reported_at"] or run["metrics_error"]:
            return []
        body = metrics_body(run, repo.sent_per_template(conn, run_id), rt.settings.optimove_sent_metric_id)
    if not body:
        return []
    try:
        rt.optimove.post("integrations", "UpdateCampaignMetrics", body)
    except TemporaryError as exc:
        if attempt >= METRICS_ATTEMPTS:
            return _metrics_failed(rt, run_id, f"gave up after {attempt} attempts: {exc}")
        wait = backoff(attempt, cap=60, retry_after=exc.retry_after)
        log.warning("metrics report of run %s failed (%s); retry in %.1fs", run_id, exc, wait)
        return [dispatch.report_metrics(run_id, attempt + 1, countdown=wait)]
    except PermanentError as exc:
        return _metrics_failed(rt, run_id, str(exc))
    with unit_of_work(rt.engine) as conn:
        repo.mark_metrics(conn, run_id)
    log.info("run %s: reported %d template metric(s) to Optimove", run_id, len(body))
    return []


def _metrics_failed(rt, run_id: int, reason: str) -> list[Enqueue]:
    log.error("metrics report of run %s failed: %s", run_id, reason)
    with unit_of_work(rt.engine) as conn:
        repo.mark_metrics(conn, run_id, error=reason)
    return []


# -- runs with a deadline (conditional execution) --------------------------------------------

EXPIRED = "ClearanceRequiredBy is too close: the grant was not sent"
REPORT_CHUNK = 10_000  # UpdateCustomerPromotionStatus takes at most 10,000 customers per call


def before_delivery(rt, conn, table, run_id: int, claimed: list) -> list:
    """The rows to deliver: a run's deadline that a bonus call might overrun expires them instead (a grant
    that lands after ClearanceRequiredBy would give a customer a campaign Optimove did not schedule)."""
    if table is not repo.GRANTS:
        return claimed
    if repo.deadline_near(conn, run_id, rt.settings.bonus_timeout + 1) is None:
        return claimed
    expired = set(repo.expire_claimed(conn, run_id, [row.id for row in claimed], EXPIRED))
    if expired:
        metrics.after_commit(conn, lambda: metrics.ledger_settled("grants", claimed[0].source, expired=len(expired)))
        log.warning("run %s: %d grant(s) expired: the deadline is too close to send them", run_id, len(expired))
        repo.record_promotion_statuses(conn, run_id, claimed[0].values["campaign_id"],
                                       sorted({row.values["customer_id"] for row in claimed if row.id in expired}))
    return [row for row in claimed if row.id not in expired]


def after_settle(rt, conn, run_id: int, claimed: list) -> list[Enqueue]:
    """For a run with a deadline, record the outcome of each customer of a settled batch whose codes are all
    settled; a full report's worth goes out at once, the rest with the next tick (`conditional.tick`)."""
    if not claimed or repo.run_deadline(conn, run_id) is None:
        return []
    repo.record_promotion_statuses(conn, run_id, claimed[0].values["campaign_id"],
                                   sorted({row.values["customer_id"] for row in claimed}))
    if repo.unreported_count(conn, run_id) >= REPORT_CHUNK:
        return [dispatch.report_statuses(run_id)]
    return []
