"""Re-drive what Postgres says is unfinished: notifications, runs, and each ledger's claimed rows.

The sweeper (beat, every `RELAY_SWEEP_INTERVAL`) re-enqueues work nobody touched for
`RELAY_SWEEP_AFTER` seconds: its task was lost with a worker or with Redis. Every step is safe
to replay. `redrive_campaign` sends a campaign's parked (failed) work again on request.
"""
from __future__ import annotations

import logging

from shared import dispatch, repository as repo
from shared.db import unit_of_work
from shared.dispatch import Enqueue
from shared.flows import conditional, runs
from shared.flows.grants import GRANTS
from shared.flows.ledger import Scope
from shared.flows.revokes import REVOKES
from shared.flows.sends import SENDS

log = logging.getLogger(__name__)

LEDGERS = (GRANTS, SENDS, REVOKES)


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
                out += runs.finish(rt, conn, run["id"])
        for ledger in LEDGERS:
            out += ledger.stale(rt, conn)
        out += _late_revokes(rt, conn)
        if rt.settings.optimove_report_metrics:  # a report task lost with a worker or with Redis
            out += [dispatch.report_metrics(i) for i in repo.runs_with_metrics_due(conn, 5 * age)]
    if out:
        log.warning("sweeper re-drives %d task(s)", len(out))
    return out


def _late_revokes(rt, conn) -> list[Enqueue]:
    """Revokes for grants to customers on a cancellation list that settled `granted` unseen (their batch and
    the list's page committed at the same moment)."""
    out: list[Enqueue] = []
    for campaign_id, customers in repo.unrevoked_cancelled_grants(conn).items():
        run_id = repo.cancellation_run(conn, campaign_id)
        ids = REVOKES.claim_late(conn, Scope(campaign_id, None, "cancellation", run_id=run_id), customers)
        out += REVOKES.deliveries(((run_id, i, "cancellation") for i in ids), rt.settings)
    return out


def release_due(rt) -> list[Enqueue]:
    """Beat's frequent job (every `RELAY_RELEASE_INTERVAL`): deliveries for ledger rows whose due time has
    come (each released once, by Postgres' clock); runs with a deadline closed or reported (`conditional.tick`)."""
    out: list[Enqueue] = []
    for ledger in LEDGERS:
        out += ledger.release_due(rt)
    return out + conditional.tick(rt)


def redrive_campaign(rt, campaign_id: int) -> tuple[int, dict[str, int], list[Enqueue]]:
    """Send a campaign's parked work again: failed runs resume paging at their cursor, failed ledger rows
    are re-delivered with the same idempotency keys. Returns (runs, rows per ledger table, work to enqueue)."""
    rows: dict[str, int] = {}
    with unit_of_work(rt.engine) as conn:
        runs = repo.redrive_failed_runs(conn, campaign_id)
        out = [dispatch.fetch_page(run["id"]) for run in runs]
        for ledger in LEDGERS:
            rows[ledger.table.name], items = ledger.redrive(rt, conn, campaign_id)
            out += items
    return len(runs), rows, out
