"""`/healthz` (process up) and `/readyz` (Postgres and Redis reachable)."""
from __future__ import annotations

import sqlalchemy as sa
from flask import Blueprint, Flask, jsonify

from web.context import runtime

bp = Blueprint("health", __name__)


@bp.get("/healthz")
def healthz():
    """The process answers."""
    return jsonify({"status": "ok"})


@bp.get("/readyz")
def readyz():
    """Both stores reachable; 503 naming the one that is not."""
    rt = runtime()
    checks: dict[str, str] = {}
    try:
        with rt.engine.connect() as conn:
            conn.execute(sa.text("SELECT 1"))
        checks["postgres"] = "ok"
    except Exception as exc:
        checks["postgres"] = f"unreachable: {type(exc).__name__}"
    try:
        rt.redis.ping()
        checks["redis"] = "ok"
    except Exception as exc:
        checks["redis"] = f"unreachable: {type(exc).__name__}"
    down = [name for name, state in checks.items() if state != "ok"]
    body = {"status": "ready" if not down else "unavailable", "checks": checks}
    if down:
        body["error"] = " and ".join(down) + (" is" if len(down) == 1 else " are") + " unreachable"
    return jsonify(body), (503 if down else 200)


def init_app(app: Flask) -> None:
    """Register the health endpoints."""
    app.register_blueprint(bp)
