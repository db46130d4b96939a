"""`/healthz` (process up) and `/readyz` (Postgres, Redis and, when it is not that Redis, the broker reachable)."""
from __future__ import annotations

import sqlalchemy as sa
from flask import Blueprint, Flask, jsonify

from shared import broker
from web.context import runtime
from web.metrics import broker_client

bp = Blueprint("health", __name__)


@bp.get("/healthz")
def healthz():
    """The process answers."""
    return jsonify({"status": "ok"})


@bp.get("/readyz")
def readyz():
    """Postgres, Redis and the Celery broker reachable; 503 naming each one that is not.

    The broker is checked on its own (as `rabbitmq`, or `broker` for another Redis) only when `BROKER_URL`
    is not `REDIS_URL`.
    """
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
    url = rt.settings.celery_broker_url
    if url and url != rt.settings.redis_url:
        name = "rabbitmq" if broker.is_amqp_url(url) else "broker"
        try:
            probe = broker.amqp_probe(url)
            if probe is not None:
                probe.ping()
            else:
                broker_client(url).ping()
            checks[name] = "ok"
        except Exception as exc:
            checks[name] = f"unreachable: {type(exc).__name__}"
    down = [name for name, state in checks.items() if state != "ok"]
    body = {"status": "ready" if not down else "unavailable", "checks": checks}
    if down:
        body["error"] = " and ".join(down) + (" is" if len(down) == 1 else " are") + " unreachable"
    return jsonify(body), (503 if down else 200)


def init_app(app: Flask) -> None:
    """Register the health endpoints."""
    app.register_blueprint(bp)
