"""`/api/` — status views for operators, behind basic auth."""
from __future__ import annotations

import hmac

from flask import Blueprint, Flask, jsonify, request

from shared import repository as repo
from shared.db import unit_of_work
from web.app import runtime
from web.errors import ApiError

bp = Blueprint("api", __name__, url_prefix="/api")

COUNTS = ("fetched", "claimed", "duplicates_skipped", "granted", "rejected", "failed")


@bp.before_request
def _basic_auth():
    settings = runtime().settings
    auth = request.authorization
    ok = (auth is not None and settings.admin_password is not None
          and hmac.compare_digest((auth.username or "").encode(), settings.admin_user.encode())
          & hmac.compare_digest((auth.password or "").encode(), settings.admin_password.get().encode()))
    if not ok:
        response = jsonify({"status": "error", "error": "unauthorized"})
        response.status_code = 401
        response.headers["WWW-Authenticate"] = 'Basic realm="relay"'
        return response
    return None


def campaign_status(conn, campaign_id: int) -> dict:
    """Runs of a campaign with cursor, counts, status and timings, plus totals and an overall status."""
    runs = repo.runs_for_campaign(conn, campaign_id)
    out_runs = []
    for r in runs:
        seconds = ((r["finished_at"] or r["updated_at"]) - r["created_at"]).total_seconds()
        out_runs.append({
            "run_id": r["id"], "notification_id": r["notification_id"], "flow": r["flow"],
            "channel_id": r["channel_id"], "status": r["status"], "cursor": r["cursor"],
            "pages_fetched": r["pages_fetched"], "fetch_done": r["fetch_done"],
            **{k: r[k] for k in COUNTS}, "attempts": r["attempts"], "last_error": r["last_error"],
            "created_at": r["created_at"].isoformat(),
            "finished_at": r["finished_at"].isoformat() if r["finished_at"] else None,
            "seconds": round(seconds, 3),
        })
    statuses = {r["status"] for r in runs}
    overall = ("unknown" if not runs else "running" if "running" in statuses
               else "failed" if "failed" in statuses else "done")
    return {"campaign_id": campaign_id, "status": overall, "runs": out_runs,
            "totals": {k: sum(r[k] for r in runs) for k in COUNTS},
            "ledger": repo.grant_counts(conn, campaign_id)}


@bp.get("/campaigns/<int:campaign_id>")
def campaign(campaign_id: int):
    """Status of one campaign (`status: unknown` while the relay has no run for it)."""
    with unit_of_work(runtime().engine) as conn:
        return jsonify(campaign_status(conn, campaign_id))


def init_app(app: Flask) -> None:
    """Register the `/api/` blueprint."""
    app.register_blueprint(bp)


@bp.get("/notifications/<int:notification_id>")
def notification(notification_id: int):
    """One inbox row: event type, ids, status, attempts, last error, times (404 when unknown)."""
    with unit_of_work(runtime().engine) as conn:
        row = repo.get_notification(conn, notification_id)
    if row is None:
        raise ApiError(404, f"no notification {notification_id}")
    row.pop("raw_body", None)
    for key in ("received_at", "updated_at", "processed_at"):
        row[key] = row[key].isoformat() if row[key] else None
    return jsonify(row)
