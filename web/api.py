"""`/api/` — status views for operators, behind basic auth."""
from __future__ import annotations

import hmac

from flask import Blueprint, Flask, jsonify, request

from shared import repository as repo
from shared.db import unit_of_work
from shared.views import campaign_status
from web.context import runtime
from web.errors import ApiError

bp = Blueprint("api", __name__, url_prefix="/api")

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
