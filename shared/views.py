"""Status views shared by the web API and the CLI (plain dicts, ready for JSON)."""
from __future__ import annotations

from datetime import datetime, timezone

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
    out_runs = [_run_fields(r, waiting.get(r["id"], 0)) for r in runs]
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


def _run_fields(r: dict, waiting: int) -> dict:
    """A run row as `campaign_status` shows it (JSON-ready)."""
    seconds = ((r["finished_at"] or r["updated_at"]) - r["created_at"]).total_seconds()
    return {
        "run_id": r["id"], "notification_id": r["notification_id"], "flow": r["flow"],
        "channel_id": r["channel_id"], "status": r["status"], "cursor": r["cursor"],
        "pages_fetched": r["pages_fetched"], "fetch_done": r["fetch_done"],
        **{k: r[k] for k in COUNTS}, "waiting": waiting,
        "attempts": r["attempts"], "last_error": r["last_error"],
        "created_at": r["created_at"].isoformat(),
        "finished_at": r["finished_at"].isoformat() if r["finished_at"] else None,
        "seconds": round(seconds, 3),
        "metrics_reported_at": r["metrics_reported_at"].isoformat() if r["metrics_reported_at"] else None,
        "metrics_error": r["metrics_error"],
        "deadline": r["deadline"].isoformat() if r["deadline"] else None,
        "reported_true": r["reported_true"], "reported_false": r["reported_false"], "expired": r["expired"],
        "revoked": r["revoked"], "cancelled": r["cancelled"],
    }


# -- admin views: `/admin` and `/api/overview|campaigns|notifications` read the same dicts ----------

SETTLED = ("granted", "sent", "revoked", "rejected", "failed", "expired", "cancelled")
DELIVERED_AS = {"scheduled_send": "sent", "realtime_send": "sent", "cancellation": "revoked"}
LIMIT_DEFAULT, LIMIT_MAX = 50, 500


def _iso(value) -> str | None:
    return value.isoformat() if value is not None else None


def _with_progress(run: dict, campaign_id: int, now, unreported: int) -> dict:
    """`run` (as `campaign_status` shows it) plus its campaign, progress and, with a deadline, time left.

    `progress` is the percentage of its claimed rows that are settled (100 once the run is done);
    while pages are still being fetched it is the share of what was claimed so far.
    """
    settled = sum(run[k] for k in SETTLED)
    claimed = run["claimed"]
    if run["status"] == "done" or (claimed == 0 and run["fetch_done"]):
        progress = 100.0
    else:
        progress = round(min(100.0, 100.0 * settled / claimed), 1) if claimed else 0.0
    deadline = datetime.fromisoformat(run["deadline"]) if run["deadline"] else None
    finished = datetime.fromisoformat(run["finished_at"]) if run["finished_at"] else None
    delivered_as = DELIVERED_AS.get(run["flow"], "granted")
    return {**run, "campaign_id": campaign_id, "delivered_as": delivered_as, "delivered": run[delivered_as],
            "settled": settled, "in_flight": max(0, claimed - settled - run["waiting"]), "progress": progress,
            "unreported": unreported if deadline else None,
            "time_left_seconds": round((deadline - now).total_seconds(), 1) if deadline else None,
            "finished_before_deadline_seconds":
                round((deadline - finished).total_seconds(), 1) if deadline and finished else None}


def _runs(conn, rows: list[dict], now) -> list[dict]:
    ids = [r["id"] for r in rows]
    waiting = repo.waiting_for_runs(conn, ids)
    unreported = repo.unreported_for_runs(conn, [r["id"] for r in rows if r["deadline"] is not None])
    return [_with_progress(_run_fields(r, waiting.get(r["id"], 0)), r["campaign_id"], now,
                           unreported.get(r["id"], 0)) for r in rows]


def notification_view(row: dict) -> dict:
    """An inbox row without its body (JSON-ready)."""
    return {**row, **{k: _iso(row[k]) for k in ("received_at", "updated_at", "processed_at")}}


def rate_limit_view(redis_client, rate_limit) -> dict:
    """The Optimove rate limit and the waits the shared limiter handed out (see `shared.optimove.waits`)."""
    from shared.optimove.waits import read_waits

    out = {"limit": rate_limit.count if rate_limit else None,
           "window_seconds": rate_limit.seconds if rate_limit else None, "available": False, "error": None,
           "count": 0, "seconds": 0.0, "priority_count": 0, "max_seconds": 0.0, "last_at": None,
           "last_seconds": None, "recent_minutes": 15, "recent_count": 0, "recent_seconds": 0.0}
    if redis_client is None:
        out["error"] = "no Redis configured"
        return out
    try:
        waits = read_waits(redis_client)
    except Exception as exc:
        out["error"] = f"Redis unreachable: {type(exc).__name__}"
        return out
    waits.pop("now", None)
    last = waits.pop("last_at")
    return {**out, **waits, "available": True,
            "last_at": datetime.fromtimestamp(last, timezone.utc).isoformat() if last else None}


def overview(conn, *, limit: int = LIMIT_DEFAULT, redis_client=None, rate_limit=None) -> dict:
    """What `/admin` shows: the newest notifications and runs of every flow, the conditional runs, the
    rate-limit waits, and the runs and notifications with errors (each list at most `limit` long)."""
    now = repo.database_now(conn)
    runs = repo.recent_runs(conn, limit)
    conditional = repo.recent_runs(conn, limit, with_deadline=True)
    error_runs = repo.runs_with_errors(conn, limit)
    return {
        "generated_at": now.isoformat(),
        "limit": limit,
        "notifications": [notification_view(n) for n in repo.list_notifications(conn, limit=limit)],
        "runs": _runs(conn, runs, now),
        "conditional_runs": _runs(conn, conditional, now),
        "rate_limit": rate_limit_view(redis_client, rate_limit),
        "errors": {"runs": _runs(conn, error_runs, now),
                   "notifications": [notification_view(n) for n in repo.notifications_with_errors(conn, limit)]},
    }


def recent_runs(conn, *, limit: int = LIMIT_DEFAULT, status: str | None = None) -> dict:
    """The newest runs of every flow, newest first (`GET /api/campaigns`)."""
    now = repo.database_now(conn)
    return {"limit": limit, "status": status, "runs": _runs(conn, repo.recent_runs(conn, limit, status=status), now)}


def recent_notifications(conn, *, limit: int = LIMIT_DEFAULT, status: str | None = None,
                         event_type: int | None = None, campaign_id: int | None = None) -> dict:
    """The newest notifications without their bodies, newest first (`GET /api/notifications`)."""
    rows = repo.list_notifications(conn, status=status, event_type=event_type, campaign_id=campaign_id, limit=limit)
    return {"limit": limit, "status": status, "event_type": event_type, "campaign_id": campaign_id,
            "notifications": [notification_view(n) for n in rows]}


def campaign_detail(conn, campaign_id: int) -> dict:
    """`campaign_status` with more per run: its campaign, progress, delivered, settled, in flight and, for a
    conditional run, unreported statuses and time left; `known` says whether the relay has any record of it."""
    status = campaign_status(conn, campaign_id)
    now = repo.database_now(conn)
    unreported = repo.unreported_for_runs(conn, [r["run_id"] for r in status["runs"] if r["deadline"]])
    status["runs"] = [_with_progress(r, campaign_id, now, unreported.get(r["run_id"], 0)) for r in status["runs"]]
    status["known"] = bool(status["runs"]) or repo.campaign_known(conn, campaign_id)
    status["generated_at"] = now.isoformat()
    return status


def ledger_page(conn, campaign_id: int, ledger: str, *, status: str | None = None, limit: int = LIMIT_DEFAULT,
                offset: int = 0, before: int | None = None) -> dict:
    """A page of a campaign's rows in one ledger (`grants`, `sends`, `revokes`), newest first.

    `next_before` is the `before` of the next page (None on the last one).
    """
    table = {t.name: t for t in repo.LEDGER_TABLES}[ledger]
    rows = repo.ledger_rows(conn, table, campaign_id, status=status, limit=limit + 1, offset=offset, before=before)
    more = len(rows) > limit
    rows = rows[:limit]
    times = ("created_at", "updated_at", "scheduled_time")
    return {"campaign_id": campaign_id, "ledger": ledger, "status": status, "limit": limit, "offset": offset,
            "before": before, "has_more": more, "next_before": rows[-1]["id"] if more else None,
            "rows": [{**r, **{k: _iso(r[k]) for k in times if k in r}} for r in rows]}
