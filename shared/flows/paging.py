"""Paging through an Optimove customer list: one page per task, resumable, rate limited.

A run fetches the page at its cursor, claims the page's ledger rows and advances the cursor in
one transaction (the run row is locked and the cursor checked), so a crash resumes at the page
where it stopped and never claims twice. 429s wait without counting an attempt; 5xx, timeouts
and connection errors retry with capped backoff and park the run after `OPTIMOVE_MAX_ATTEMPTS`,
and so does a page whose claim raises (a poison page: it would otherwise be re-driven forever);
400/401/403/404 park it at once. A paged flow only says what to fetch and what a page claims
(`base.Pages`).
"""
from __future__ import annotations

import logging
import random
from typing import Any, Mapping

from shared import dispatch, metrics, repository as repo
from shared.db import DatabaseUnavailable, unit_of_work
from shared.dispatch import Enqueue
from shared.flows import runs
from shared.flows.base import Flow, Outcome, Pages
from shared.flows.ledger import Scope
from shared.logs import log_context
from shared.optimove.client import PermanentError, RateLimited, TemporaryError, Throttled, backoff

log = logging.getLogger(__name__)


def start_run(conn, notification: dict, flow: Flow) -> Outcome:
    """Open the flow's run for a notification (once per notification) and enqueue its first page."""
    run_id, _ = repo.create_run(conn, notification["id"], flow.name, notification["campaign_id"],
                                notification["channel_id"])
    return Outcome("done", follow_ups=[dispatch.fetch_page(run_id)])


def fetch_next_page(rt, run_id: int, flows: Mapping[str, Flow]) -> list[Enqueue]:
    """Fetch the page at the run's cursor, claim its rows, advance the cursor; enqueue what follows.

    `flows` maps the run's flow name to its `Flow` (`routing.FLOWS`).
    """
    with unit_of_work(rt.engine) as conn:
        run = repo.get_run(conn, run_id)
        if run is None or run["status"] != "running":
            return []
        if run["fetch_done"]:
            return runs.finish(rt, conn, run_id)
        # a run with a deadline stops fetching while there is still time to report what it granted
        margin = rt.settings.optimove_rate_limit.seconds + 5.0
        if run["deadline"] is not None and repo.deadline_near(conn, run_id, margin) is not None:
            repo.touch_run(conn, run_id, error=f"stopped fetching at {run['cursor']}: the deadline is less than "
                                               f"{margin:g} s away, the time left goes to status reports")
            log.warning("run %s stops fetching at %d: its deadline is near", run_id, run["cursor"])
            return []
    pages = flows[run["flow"]].pages
    skip, top = run["cursor"], rt.settings.optimove_page_size
    with log_context(run_id=run_id, campaign_id=run["campaign_id"]):
        try:
            rows = rt.optimove.fetch_page(pages.category, pages.function, pages.params(run, rt.settings),
                                         skip=skip, top=top)
        except RateLimited as exc:
            with unit_of_work(rt.engine) as conn:
                repo.touch_run(conn, run_id)
            return [dispatch.fetch_page(run_id, countdown=exc.retry_after)]
        except Throttled as exc:  # a 429 is not a failure of the page: no attempt counted, wait < one window
            window = rt.settings.optimove_rate_limit.seconds
            with unit_of_work(rt.engine) as conn:
                repo.touch_run(conn, run_id, error=str(exc))
            wait = min(exc.retry_after, 300) if exc.retry_after else random.uniform(0.2, 1.0) * window
            log.warning("Optimove throttled run %s (%s); next try in %.1fs", run_id, exc, wait)
            return [dispatch.fetch_page(run_id, countdown=wait)]
        except TemporaryError as exc:
            return _page_failed(rt, run_id, exc)
        except PermanentError as exc:
            log.error("run %s failed: %s", run_id, exc)
            with unit_of_work(rt.engine) as conn:
                metrics.run_row_ended(conn, repo.fail_run(conn, run_id, str(exc)))
            return []
        try:
            return claim_page(rt, run, pages, skip, top, rows)
        except DatabaseUnavailable as exc:  # nothing was claimed: the page is fetched again shortly
            log.warning("claiming page at %d of run %s failed (%s); retrying", skip, run_id, exc)
            return [dispatch.fetch_page(run_id, countdown=backoff(2, cap=10))]
        except Exception as exc:  # a page that cannot be claimed (a row Postgres cannot hold): counted, then parked
            log.exception("claiming page at %d of run %s raised", skip, run_id)
            return _page_failed(rt, run_id, TemporaryError(f"page at {skip} cannot be claimed: "
                                                           f"{type(exc).__name__}: {exc}"))


def _page_failed(rt, run_id: int, exc: TemporaryError) -> list[Enqueue]:
    with unit_of_work(rt.engine) as conn:
        attempts = repo.touch_run(conn, run_id, error=str(exc), count_attempt=True)
        if attempts >= rt.settings.optimove_max_attempts:
            metrics.run_row_ended(conn, repo.fail_run(conn, run_id, f"gave up after {attempts} attempts: {exc}"))
            log.error("run %s failed after %d attempts: %s", run_id, attempts, exc)
            return []
    wait = backoff(attempts, cap=30, retry_after=exc.retry_after)
    log.warning("page of run %s failed (%s); retry %d in %.1fs", run_id, exc, attempts, wait)
    return [dispatch.fetch_page(run_id, countdown=wait)]


def claim_page(rt, run: dict, pages: Pages, skip: int, top: int, rows: list[Any]) -> list[Enqueue]:
    """Claim a fetched page and advance the cursor, unless another task already took the page."""
    claims = pages.claims(rows, run, rt.settings)
    fetch_done = len(rows) < top
    scope = Scope(run["campaign_id"], run["channel_id"], pages.source, run_id=run["id"])
    with unit_of_work(rt.engine) as conn:
        locked = repo.get_run(conn, run["id"], lock=True)
        if locked["status"] != "running" or locked["cursor"] != skip:
            log.info("page at %d of run %s already taken by another task", skip, run["id"])
            return []
        ids = pages.ledger.claim(conn, scope, claims)  # due now; ids.waiting more wait for their time
        won = len(ids) + ids.waiting
        repo.advance_run(conn, run["id"], rows=len(rows), claimed=won, duplicates=len(claims) - won,
                         fetch_done=fetch_done)
        out = runs.finish(rt, conn, run["id"]) if fetch_done and not won else []
    log.info("run %s page at %d: %d rows, %d claimed (%d waiting for their time), %d already in the ledger",
             run["id"], skip, len(rows), won, ids.waiting, len(claims) - won)
    out += pages.ledger.deliveries(((run["id"], i, pages.source) for i in ids), rt.settings)
    if not fetch_done:
        out.append(dispatch.fetch_page(run["id"]))
    return out
