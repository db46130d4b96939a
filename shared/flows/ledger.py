"""The machinery every campaign flow shares: page through Optimove, claim grants, deliver them.

A run fetches one page per task. The page's grants are claimed and the cursor advanced in one
transaction, so a crash resumes at the page where it stopped and never claims twice. Claimed
grants go to the bonus system in batches; a grant moves `claimed -> granted | rejected | failed`
exactly once, whatever replays the batch.
"""
from __future__ import annotations

import logging
import random
from dataclasses import dataclass
from typing import Any, Callable

from shared import dispatch, repository as repo
from shared.adapters.bonus import GrantItem, idempotency_key
from shared.db import DatabaseUnavailable, unit_of_work
from shared.dispatch import Enqueue
from shared.logs import log_context
from shared.optimove.client import PermanentError, RateLimited, TemporaryError, Throttled, backoff

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PagedFlow:
    """How a flow pages: which Optimove function, with which parameters, and what a row grants."""

    name: str
    category: str
    function: str
    params: Callable[[dict], dict]
    pairs: Callable[[dict], list[tuple[str, str]] | None]


FLOWS: dict[str, PagedFlow] = {}


def register(flow: PagedFlow) -> PagedFlow:
    """Make a paged flow known to the page and sweep tasks by its name (stored on the run)."""
    FLOWS[flow.name] = flow
    return flow


def fetch_next_page(rt, run_id: int) -> list[Enqueue]:
    """Fetch the page at the run's cursor, claim its grants, advance the cursor; enqueue what follows."""
    with unit_of_work(rt.engine) as conn:
        run = repo.get_run(conn, run_id)
        if run is None or run["status"] != "running":
            return []
        if run["fetch_done"]:
            repo.finish_run_if_complete(conn, run_id)
            return []
    flow = FLOWS[run["flow"]]
    skip, top = run["cursor"], rt.settings.optimove_page_size
    with log_context(run_id=run_id, campaign_id=run["campaign_id"]):
        try:
            rows = rt.optimove.fetch_page(flow.category, flow.function, flow.params(run), skip=skip, top=top)
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
                repo.fail_run(conn, run_id, str(exc))
            return []
        try:
            return _claim_page(rt, run, flow, skip, top, rows)
        except DatabaseUnavailable as exc:  # nothing was claimed: the page is fetched again shortly
            log.warning("claiming page at %d of run %s failed (%s); retrying", skip, run_id, exc)
            return [dispatch.fetch_page(run_id, countdown=backoff(2, cap=10))]


def _page_failed(rt, run_id: int, exc: TemporaryError) -> list[Enqueue]:
    with unit_of_work(rt.engine) as conn:
        attempts = repo.touch_run(conn, run_id, error=str(exc), count_attempt=True)
        if attempts >= rt.settings.optimove_max_attempts:
            repo.fail_run(conn, run_id, f"gave up after {attempts} attempts: {exc}")
            log.error("run %s failed after %d attempts: %s", run_id, attempts, exc)
            return []
    wait = backoff(attempts, cap=30, retry_after=exc.retry_after)
    log.warning("page of run %s failed (%s); retry %d in %.1fs", run_id, exc, attempts, wait)
    return [dispatch.fetch_page(run_id, countdown=wait)]


def _claim_page(rt, run: dict, flow: PagedFlow, skip: int, top: int, rows: list[Any]) -> list[Enqueue]:
    pairs: list[tuple[str, str]] = []
    for row in rows:
        pairs.extend(flow.pairs(row) or ())
    fetch_done = len(rows) < top
    with unit_of_work(rt.engine) as conn:
        locked = repo.get_run(conn, run["id"], lock=True)
        if locked["status"] != "running" or locked["cursor"] != skip:
            log.info("page at %d of run %s already taken by another task", skip, run["id"])
            return []
        ids = repo.claim_grants(conn, run_id=run["id"], campaign_id=run["campaign_id"],
                                channel_id=run["channel_id"], source=flow.name, pairs=pairs)
        repo.advance_run(conn, run["id"], rows=len(rows), claimed=len(ids), duplicates=len(pairs) - len(ids),
                         fetch_done=fetch_done)
        if fetch_done and not ids:
            repo.finish_run_if_complete(conn, run["id"])
    log.info("run %s page at %d: %d rows, %d claimed, %d already granted", run["id"], skip, len(rows),
             len(ids), len(pairs) - len(ids))
    size = rt.settings.bonus_batch_size
    out = dispatch.grant_batches(((run["id"], i) for i in ids), size)
    if not fetch_done:
        out.append(dispatch.fetch_page(run["id"]))
    return out


def deliver_grants(rt, run_id: int | None, grant_ids: list[int]) -> list[Enqueue]:
    """Send the still-claimed grants among `grant_ids` to the bonus system and record each result."""
    with unit_of_work(rt.engine) as conn:
        claimed = repo.claimed_grants(conn, grant_ids)
        if not claimed:
            if run_id is not None:
                repo.finish_run_if_complete(conn, run_id)
            return []
    items = {idempotency_key(g.campaign_id, g.customer_id, g.promo_code): g for g in claimed}
    try:
        results = rt.bonus.grant([GrantItem(key, g.campaign_id, g.channel_id, g.customer_id, g.promo_code,
                                            g.source) for key, g in items.items()])
        by_key = {r.idempotency_key: r for r in results}
    except Exception as exc:  # an adapter bug or outage must not lose the batch
        log.exception("bonus adapter raised; batch of %d will be retried", len(items))
        by_key, reason = {}, f"adapter error: {type(exc).__name__}: {exc}"
    else:
        reason = "no result from the bonus adapter"
    granted, rejected, retry = [], [], []
    for key, g in items.items():
        r = by_key.get(key)
        if r is not None and r.status == "granted":
            granted.append((g.id, r.reference))
        elif r is not None and r.status == "rejected":
            rejected.append((g.id, r.reason or "rejected by the bonus system"))
        else:
            retry.append((g.id, (r.reason if r is not None and r.reason else reason)))
    with unit_of_work(rt.engine) as conn:
        settled = repo.settle_grants(conn, run_id, granted=granted, rejected=rejected, retry=retry,
                                     max_attempts=rt.settings.bonus_max_attempts)
        if run_id is not None and not settled.retry_ids:
            repo.finish_run_if_complete(conn, run_id)
    log.info("grants of run %s: %d granted, %d rejected, %d failed, %d to retry", run_id, settled.granted,
             settled.rejected, settled.failed, len(settled.retry_ids))
    if settled.retry_ids:
        attempt = 1 + max(g.attempts for g in claimed)
        return [dispatch.grant_batch(run_id, settled.retry_ids, countdown=backoff(attempt, cap=30))]
    return []


def redrive_campaign(rt, campaign_id: int) -> tuple[int, int, list[Enqueue]]:
    """Send a campaign's parked work again: failed runs resume paging at their cursor, failed grants
    are re-delivered with the same idempotency keys. Returns (runs, grants, work to enqueue)."""
    with unit_of_work(rt.engine) as conn:
        runs = repo.redrive_failed_runs(conn, campaign_id)
        grants = repo.redrive_failed_grants(conn, campaign_id)
    out = [dispatch.fetch_page(run["id"]) for run in runs]
    out += dispatch.grant_batches(grants, rt.settings.bonus_batch_size)
    return len(runs), len(grants), out
