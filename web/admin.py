"""`/admin`: server-rendered pages for operators, behind the same basic auth as `/api/`.

`/admin` shows the newest notifications and runs of every flow (progress and counts), the
conditional runs with their deadlines, the rate-limit waits and the errors; `/admin/campaigns/<id>`
shows one campaign's runs and its ledger rows, filtered by ledger and status. The pages read the
same view dicts (`shared/views.py`) as `/api/overview`, `/api/campaigns/<id>` and its `/ledger`.
Templates live in `web/templates/` (Jinja autoescapes every value); no JavaScript.
"""
from __future__ import annotations

from datetime import datetime, timezone

from flask import Blueprint, Flask, Response, redirect, render_template, url_for
from werkzeug.http import HTTP_STATUS_CODES

from shared import repository as repo, views
from shared.db import DatabaseUnavailable, unit_of_work
from web.auth import require_admin
from web.context import runtime
from web.errors import ApiError
from web.query import choice_arg, id_arg, limit_arg, offset_arg

bp = Blueprint("admin", __name__, url_prefix="/admin", template_folder="templates")

LEDGERS = tuple(t.name for t in repo.LEDGER_TABLES)


@bp.before_request
def _basic_auth():
    return require_admin(lambda: Response("401 Unauthorized: this page needs the relay's admin user and password "
                                          "(RELAY_ADMIN_USER / RELAY_ADMIN_PASSWORD).\n", mimetype="text/plain"))


def _page(template: str, status: int = 200, **context) -> tuple[str, int, dict]:
    html = render_template(template, **context)
    return html, status, {"Content-Type": "text/html; charset=utf-8", "Cache-Control": "no-store"}


@bp.errorhandler(ApiError)
def _refused(exc: ApiError):
    return _page("admin_error.html", exc.status, title=f"{exc.status} {HTTP_STATUS_CODES.get(exc.status, '')}",
                 message=exc.message)


@bp.errorhandler(DatabaseUnavailable)
def _db_down(exc: DatabaseUnavailable):
    return _page("admin_error.html", 503, title="503 Service Unavailable",
                 message="Postgres is unavailable; try again shortly.")


@bp.get("")
@bp.get("/")
def overview():
    """Notifications, runs of every flow, conditional runs, rate-limit waits and errors."""
    limit = limit_arg()
    rt = runtime()
    with unit_of_work(rt.engine) as conn:
        data = views.overview(conn, limit=limit, redis_client=rt.redis, rate_limit=rt.settings.optimove_rate_limit)
    return _page("admin_overview.html", data=data, refresh=10)


@bp.get("/campaigns")
def find_campaign():
    """The campaign box of the overview: `?id=N` goes to that campaign's page."""
    campaign_id = id_arg("id")
    if campaign_id is None:
        raise ApiError(400, "id: expected a campaign id")
    return redirect(url_for("admin.campaign", campaign_id=campaign_id))


@bp.get("/campaigns/<id:campaign_id>")
def campaign(campaign_id: int):
    """A campaign's runs and a page of one of its ledgers (`?ledger=grants|sends|revokes&status=S`)."""
    ledger = choice_arg("ledger", LEDGERS)
    limit, offset, before = limit_arg(), offset_arg(), id_arg("before")
    with unit_of_work(runtime().engine) as conn:
        detail = views.campaign_detail(conn, campaign_id)
        if not detail["known"]:
            return _page("admin_error.html", 404, title=f"Campaign {campaign_id}: unknown",
                         message=f"The relay has no notification, run or ledger row of campaign {campaign_id}.")
        # without ?ledger=, the first ledger the campaign has rows in
        ledger = ledger or next((name for name in LEDGERS if detail["ledgers"].get(name)), "grants")
        status = choice_arg("status", repo.ANY_LEDGER_STATUS)
        page = views.ledger_page(conn, campaign_id, ledger, status=status, limit=limit, offset=offset, before=before)
    return _page("admin_campaign.html", detail=detail, page=page, ledgers=LEDGERS,
                 statuses=repo.LEDGER_STATUSES[ledger])


# -- template helpers ----------------------------------------------------------------------------

def _parse(value) -> datetime | None:
    if not value:
        return None
    moment = datetime.fromisoformat(value) if isinstance(value, str) else value
    return moment.astimezone(timezone.utc)


def when(value) -> str:
    """`2026-11-27 10:03:04` in UTC (empty for None)."""
    moment = _parse(value)
    return moment.strftime("%Y-%m-%d %H:%M:%S") if moment else ""


def clock(value) -> str:
    """`10:03:04` for today (UTC), `11-27 10:03:04` for another day (empty for None)."""
    moment = _parse(value)
    if moment is None:
        return ""
    today = datetime.now(timezone.utc).date() == moment.date()
    return moment.strftime("%H:%M:%S" if today else "%m-%d %H:%M:%S")


def duration(seconds) -> str:
    """`45 s`, `3 min 05 s`, `2 h 04 min` (a sign for negatives)."""
    if seconds is None:
        return ""
    sign, s = ("-" if seconds < 0 else ""), abs(float(seconds))
    if s < 10:
        return f"{sign}{s:.1f} s"
    s = int(round(s))
    if s < 60:
        return f"{sign}{s} s"
    if s < 3600:
        return f"{sign}{s // 60} min {s % 60:02d} s"
    return f"{sign}{s // 3600} h {s % 3600 // 60:02d} min"


def ago(value, now) -> str:
    """How long before `now` `value` was (`12 s ago`)."""
    a, b = _parse(value), _parse(now)
    return f"{duration((b - a).total_seconds())} ago" if a and b else ""


def number(value) -> str:
    """`9,000` (empty for None)."""
    return "" if value is None else f"{value:,}"


def init_app(app: Flask) -> None:
    """Register `/admin` and its template filters."""
    app.register_blueprint(bp)
    app.jinja_env.filters.update(when=when, clock=clock, duration=duration, number=number)
    app.jinja_env.globals.update(ago=ago)
