"""Promotion deactivation (optional: `RELAY_DEACTIVATION=true`): when Optimove's actions end, the
promotions they granted are taken back.

1. Every hour beat asks: which of the last `DAYS` dates (in `OPTIMOVE_TIMEZONE`, up to yesterday)
   has not been processed yet? Each such date is processed once (`deactivations` table).
2. We page `GetCustomersActionEndedByDate?Date=YYYY-MM-DD`: rows carry `CustomerID`, `ActionID`
   and `ChannelID`, not the campaign or the code.
3. Every granted grant whose customer and ActionID match a row (and its channel, when both carry
   one) gets one revoke through the revoke ledger, as for a cancellation: unique per grant, so a
   grant is revoked at most once whatever replays.
4. The date is recorded `done` with how many rows were read and how many revokes were claimed.
"""
from __future__ import annotations

import logging
from datetime import date, datetime, timedelta
from zoneinfo import ZoneInfo

from shared import dispatch, repository as repo
from shared.db import unit_of_work
from shared.dispatch import Enqueue
from shared.flows.ledger import Scope
from shared.flows.revokes import REVOKES
from shared.optimove.client import OptimoveError, RateLimited
from shared.optimove.rows import lower_keys, parse_int

log = logging.getLogger(__name__)

SOURCE = "deactivation"
DAYS = 3  # a beat that was down for a day or two catches up


def dates_to_process(rt) -> list[date]:
    """The recent dates (oldest first) whose ended actions were not processed yet."""
    with unit_of_work(rt.engine) as conn:
        today = repo.database_now(conn).astimezone(ZoneInfo(rt.settings.optimove_timezone)).date()
        done = repo.deactivated_dates(conn, today - timedelta(days=DAYS))
    return [d for d in (today - timedelta(days=k) for k in range(DAYS, 0, -1)) if d not in done]


def ended_actions(rows: list) -> list[tuple[str, int, int | None]]:
    """(customer, ActionID, ChannelID) of a page of GetCustomersActionEndedByDate rows (bad rows skipped)."""
    out = []
    for row in rows:
        if not isinstance(row, dict):
            continue
        data = lower_keys(row)
        customer, action = data.get("customerid"), parse_int(data.get("actionid"))
        if customer is None or action is None or not str(customer).strip():
            continue
        out.append((str(customer).strip(), action, parse_int(data.get("channelid"))))
    return out


def deactivate(rt) -> list[Enqueue]:
    """Process every pending date; a rate-limited or failed call leaves the date for the next run."""
    if not rt.settings.deactivation:
        return []
    out: list[Enqueue] = []
    for day in dates_to_process(rt):
        with unit_of_work(rt.engine) as conn:
            repo.start_deactivation(conn, day)
        read = claimed = 0
        try:
            for page in rt.optimove.iter_pages("customers", "GetCustomersActionEndedByDate",
                                               {"Date": day.isoformat()}, rt.settings.optimove_page_size):
                rows = ended_actions(page)
                read += len(page)
                with unit_of_work(rt.engine) as conn:
                    for campaign_id, grants in repo.grants_of_ended_actions(conn, rows).items():
                        ids = REVOKES.claim_grants(conn, Scope(campaign_id, None, SOURCE), grants)
                        claimed += len(ids)
                        out += REVOKES.deliveries(((None, i, SOURCE) for i in ids), rt.settings)
        except RateLimited as exc:
            return out + [dispatch.deactivate(countdown=exc.retry_after)]
        except OptimoveError as exc:
            log.error("deactivation of %s failed: %s", day, exc)
            with unit_of_work(rt.engine) as conn:
                repo.finish_deactivation(conn, day, "failed", read, claimed, str(exc))
            continue
        with unit_of_work(rt.engine) as conn:
            repo.finish_deactivation(conn, day, "done", read, claimed)
        log.info("deactivation of %s: %d ended action row(s), %d grant(s) to revoke", day, read, claimed)
    return out
