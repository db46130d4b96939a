"""`/api/` — status views for operators, behind basic auth."""
from __future__ import annotations

from flask import Blueprint, Flask, jsonify

from shared import repository as repo, views
from shared.db import unit_of_work
from web.auth import require_admin
from web.context import runtime
from web.errors import ApiError
from web.query import accept_only, choice_arg, id_arg, int_arg, limit_arg, offset_arg

bp = Blueprint("api", __name__, url_prefix="/api")

@bp.before_request
def _basic_auth():
    return require_admin(lambda: jsonify({"status": "error", "error": "unauthorized"}))


@bp.get("/campaigns/<id:campaign_id>")
def campaign(campaign_id: int):
    """Status of one campaign (`status: unknown` while the relay has no run for it), each run with its progress."""
    accept_only()
    with unit_of_work(runtime().engine) as conn:
        return jsonify(views.campaign_detail(conn, campaign_id))


def init_app(app: Flask) -> None:
    """Register the `/api/` blueprint."""
    app.register_blueprint(bp)


@bp.get("/notifications/<id:notification_id>")
def notification(notification_id: int):
    """One inbox row: event type, ids, status, attempts, last error, times (404 when unknown)."""
    accept_only()
    with unit_of_work(runtime().engine) as conn:
        row = repo.get_notification(conn, notification_id)
    if row is None:
        raise ApiError(404, f"no notification {notification_id}")
    row.pop("raw_body", None)
    for key in ("received_at", "updated_at", "processed_at"):
        row[key] = row[key].isoformat() if row[key] else None
    return jsonify(row)


@bp.get("/overview")
def overview():
    """What `/admin` shows: newest notifications and runs, conditional runs, rate-limit waits, errors."""
    accept_only("limit")
    limit = limit_arg()
    rt = runtime()
    with unit_of_work(rt.engine) as conn:
        return jsonify(views.overview(conn, limit=limit, redis_client=rt.redis,
                                      rate_limit=rt.settings.optimove_rate_limit))


@bp.get("/campaigns")
def campaigns():
    """The newest runs of every flow (`?limit=N&status=S`)."""
    accept_only("limit", "status")
    limit, status = limit_arg(), choice_arg("status", repo.RUN_STATUSES)
    with unit_of_work(runtime().engine) as conn:
        return jsonify(views.recent_runs(conn, limit=limit, status=status))


@bp.get("/campaigns/<id:campaign_id>/ledger")
def campaign_ledger(campaign_id: int):
    """A page of a campaign's ledger rows (`?ledger=grants|sends|revokes&status=S&limit=N&offset=N&before=ID`)."""
    accept_only("ledger", "status", "limit", "offset", "before")
    ledger = choice_arg("ledger", tuple(t.name for t in repo.LEDGER_TABLES), default="grants")
    status = choice_arg("status", repo.ANY_LEDGER_STATUS)
    limit, offset, before = limit_arg(), offset_arg(), id_arg("before")
    with unit_of_work(runtime().engine) as conn:
        if not repo.campaign_known(conn, campaign_id):
            raise ApiError(404, f"no campaign {campaign_id}: the relay has no notification, run or ledger row of it")
        return jsonify(views.ledger_page(conn, campaign_id, ledger, status=status, limit=limit, offset=offset,
                                         before=before))


@bp.get("/notifications")
def notifications():
    """The newest notifications without their bodies (`?status=S&event=N&campaign=ID&limit=N`)."""
    accept_only("status", "event", "campaign", "limit")
    status = choice_arg("status", repo.NOTIFICATION_STATUSES)
    event_type = int_arg("event", 0, 2 ** 31 - 1)
    campaign_id, limit = id_arg("campaign"), limit_arg()
    with unit_of_work(runtime().engine) as conn:
        return jsonify(views.recent_notifications(conn, limit=limit, status=status, event_type=event_type,
                                                  campaign_id=campaign_id))
