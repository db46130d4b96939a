"""Status views shared by the web API and the CLI (plain dicts, ready for JSON)."""
from __future__ import annotations

from shared import repository as repo

COUNTS = ("fetched", "claimed", "duplicates_skipped", "granted", "sent", "rejected", "failed")


def campaign_status(conn, campaign_id: int) -> dict:
    """Runs of a campaign with cursor, counts, status and timings, plus totals, ledgers and an overall status.

    `ledger` is the grant ledger by status (kept for existing readers); `ledgers` has every ledger.
    `waiting` counts a run's sends held for their ScheduledTime.
    A campaign the relay knows nothing of is `unknown`.
    """
    runs = repo.runs_for_campaign(conn, campaign_id)
    waiting = repo.waiting_per_run(conn, campaign_id) if runs else {}
    out_runs = []
    for r in runs:
        seconds = ((r["finished_at"] or r["updated_at"]) - r["created_at"]).total_seconds()
        out_runs.append({
            "run_id": r["id"], "notification_id": r["notification_id"], "flow": r["flow"],
            "channel_id": r["channel_id"], "status": r["status"], "cursor": r["cursor"],
            "pages_fetched": r["pages_fetched"], "fetch_done": r["fetch_done"],
            **{k: r[k] for k in COUNTS}, "waiting": waiting.get(r["id"], 0),
            "attempts": r["attempts"], "last_error": r["last_error"],
            "created_at": r["created_at"].isoformat(),
            "finished_at": r["finished_at"].isoformat() if r["finished_at"] else None,
            "seconds": round(seconds, 3),
            "metrics_reported_at": r["metrics_reported_at"].isoformat() if r["metrics_reported_at"] else None,
            "metrics_error": r["metrics_error"],
            "deadline": r["deadline"].isoformat() if r["deadline"] else None,
            "reported_true": r["reported_true"], "reported_false": r["reported_false"], "expired": r["expired"],
            "revoked": r["revoked"], "cancelled": r["cancelled"],
        })
    ledgers = {t.name: repo.ledger_counts(conn, t, campaign_id) for t in repo.LEDGER_TABLES}
    # a real-time campaign has ledger rows but no runs: it is running while a row is in flight
    statuses = {r["status"] for r in runs} or {"running" if counts.get("claimed") or counts.get("waiting") else "done"
                                               for counts in ledgers.values() if counts}
    overall = ("unknown" if not statuses else "running" if "running" in statuses
               else "failed" if "failed" in statuses
               else "deadline_missed" if "deadline_missed" in statuses
               else "cancelled" if "cancelled" in statuses else "done")
    return {"campaign_id": campaign_id, "status": overall, "runs": out_runs,
            "totals": {k: sum(r[k] for r in out_runs) for k in (*COUNTS, "waiting")},
            "ledger": ledgers["grants"], "ledgers": ledgers}
