"""`/admin` pages and the `/api/` views they share, on real Postgres and Redis with seeded rows."""
from __future__ import annotations

import re

import pytest

from tests.conftest import ADMIN_PASSWORD

pytestmark = pytest.mark.integration

AUTH = ("admin", ADMIN_PASSWORD)
SCRIPT = '<script>alert("pwned")</script>'
PROTECTED = ["/admin", "/admin/", "/admin/campaigns/1", "/admin/campaigns?id=1", "/api/overview", "/api/campaigns",
             "/api/campaigns/1", "/api/campaigns/1/ledger", "/api/notifications", "/api/notifications/1"]


@pytest.fixture
def client(settings):
    from web.app import create_app

    return create_app(settings).test_client()


def _insert(cur, table: str, **values) -> int:
    cur.execute(f"INSERT INTO {table} ({', '.join(values)}) VALUES ({', '.join(['%s'] * len(values))}) RETURNING id",
                list(values.values()))
    return cur.fetchone()[0]


@pytest.fixture
def seeded(db):
    """Campaign 700 (bonus, two channels: one done, one running with an error), 701 (send, sends waiting),
    800 (conditional, deadline in 30 min), a failed real-time notification whose error holds a script."""
    ids = {}
    with db.cursor() as cur:
        def note(event, campaign, channel, status="done", error=None, key=None):
            return _insert(cur, "notifications", event_type=event, campaign_id=campaign, channel_id=channel,
                           dedupe_key=key or f"{event}:{campaign}:{channel}", payload="{}", raw_body="{}",
                           status=status, last_error=error, attempts=1)

        ids["n504"] = note(13, 700, 504)
        ids["n505"] = note(13, 700, 505, status="processing")
        ids["n510"] = note(13, 701, 510)
        ids["n5"] = note(5, 800, None)
        ids["n11"] = note(11, 900, 600, status="failed", error=f"bonus system said {SCRIPT}")
        ids["n2"] = note(2, None, None, status="ignored", key="2:x")
        ids["r504"] = _insert(cur, "campaign_runs", notification_id=ids["n504"], flow="scheduled_bonus",
                              campaign_id=700, channel_id=504, status="done", fetch_done=True, pages_fetched=4,
                              cursor=1500, fetched=1500, claimed=1500, duplicates_skipped=0, granted=1490,
                              rejected=7, failed=3)
        cur.execute("UPDATE campaign_runs SET finished_at = created_at + interval '12 seconds' WHERE id = %s",
                    (ids["r504"],))
        ids["r505"] = _insert(cur, "campaign_runs", notification_id=ids["n505"], flow="scheduled_bonus",
                              campaign_id=700, channel_id=505, status="running", pages_fetched=2, cursor=800,
                              fetched=800, claimed=400, duplicates_skipped=400, granted=100,
                              last_error="HTTP 503 <b>upstream</b>", attempts=2)
        ids["r510"] = _insert(cur, "campaign_runs", notification_id=ids["n510"], flow="scheduled_send",
                              campaign_id=701, channel_id=510, status="running", fetch_done=True, pages_fetched=1,
                              fetched=4, claimed=4, sent=1)
        ids["r5"] = _insert(cur, "campaign_runs", notification_id=ids["n5"], flow="conditional", campaign_id=800,
                            status="running", fetched=20, claimed=20, granted=18, rejected=2, reported_true=10,
                            reported_false=2, pages_fetched=1, fetch_done=True)
        cur.execute("UPDATE campaign_runs SET deadline = now() + interval '30 minutes' WHERE id = %s", (ids["r5"],))
        for n, status, reason in [(1, "granted", None), (2, "granted", None), (3, "rejected", "unknown promotion"),
                                  (4, "failed", f"gave up: {SCRIPT}"), (5, "failed", "timeout"),
                                  (6, "claimed", None)]:
            _insert(cur, "grants", campaign_id=700, customer_id=f"C{n}", promo_code="WB23", channel_id=504,
                    run_id=ids["r504"], source="scheduled", status=status, attempts=1 if status != "claimed" else 0,
                    reason=reason, idempotency_key=f"k{n}")
        for n, status in [(1, "sent"), (2, "waiting"), (3, "waiting"), (4, "claimed")]:
            _insert(cur, "sends", campaign_id=701, channel_id=510, customer_id=f"S{n}", template_id=14,
                    run_id=ids["r510"], source="scheduled", status=status, idempotency_key=f"s{n}",
                    scheduled_time="2030-01-01 10:00:00+00")
        for customer in ("P1", "P2", "P3"):
            cur.execute("INSERT INTO promotion_statuses (run_id, campaign_id, customer_id, status) "
                        "VALUES (%s, 800, %s, true)", (ids["r5"], customer))
    return ids


def _text(response) -> str:
    return response.get_data(as_text=True)


@pytest.mark.parametrize("url", PROTECTED)
def test_every_admin_page_and_api_view_needs_the_admin_credentials(client, url):
    for auth in (None, ("admin", "wrong"), ("someone", ADMIN_PASSWORD), ("admin", "")):
        response = client.get(url, auth=auth)
        assert response.status_code == 401, (url, auth)
        assert response.headers["WWW-Authenticate"].startswith('Basic realm="relay"')
    assert client.get(url, auth=AUTH).status_code in (200, 302, 404)


def test_no_admin_password_means_nobody_gets_in(database_url, redis_url, db):
    from tests.conftest import make_settings
    from web.app import create_app

    settings = make_settings(DATABASE_URL=database_url, REDIS_URL=redis_url, RELAY_ADMIN_PASSWORD="")
    client = create_app(settings).test_client()
    assert client.get("/admin", auth=("admin", "")).status_code == 401
    assert client.get("/api/overview", auth=("admin", "")).status_code == 401


def test_unauthorized_answers_reveal_nothing(client, seeded):
    page = client.get("/admin")
    assert "700" not in _text(page) and page.mimetype == "text/plain"
    api = client.get("/api/overview")
    assert api.json == {"status": "error", "error": "unauthorized"}


def test_overview_page_shows_runs_counts_conditional_runs_and_errors(client, seeded):
    response = client.get("/admin", auth=AUTH)
    assert response.status_code == 200 and response.mimetype == "text/html"
    assert response.headers["Cache-Control"] == "no-store"
    html = _text(response)
    runs = html[html.index('id="runs"'):html.index('id="conditional"')]
    for text in ("scheduled_bonus", "scheduled_send", "conditional", "1,500", "1,490", "granted", "sent", "100%",
                 "25%", 'href="/admin/campaigns/700"', "HTTP 503 &lt;b&gt;upstream&lt;/b&gt;"):
        assert text in runs, text
    conditional = html[html.index('id="conditional"'):html.index('id="rate-limit"')]
    assert "#%d" % seeded["r5"] in conditional and "800" in conditional
    assert re.search(r"<b>(29|30) min \d\d s</b>", conditional), conditional  # time left to the deadline
    errors = html[html.index('id="errors"'):html.index('id="notifications"')]
    assert "run #%d" % seeded["r505"] in errors and "notification #%d" % seeded["n11"] in errors
    notifications = html[html.index('id="notifications"'):]
    for nid in (seeded["n504"], seeded["n11"], seeded["n2"]):
        assert f"<td>{nid}</td>" in notifications
    assert "ignored" in notifications and "processing" in notifications


def test_every_value_is_html_escaped(client, seeded):
    html = _text(client.get("/admin", auth=AUTH))
    assert SCRIPT not in html and "<script" not in html.lower()
    assert "&lt;script&gt;alert(&#34;pwned&#34;)&lt;/script&gt;" in html
    page = _text(client.get("/admin/campaigns/700?ledger=grants&status=failed", auth=AUTH))
    assert "<script" not in page.lower() and "gave up: &lt;script&gt;" in page


def test_overview_json_is_what_the_page_shows(client, seeded):
    data = client.get("/api/overview", auth=AUTH).json
    assert set(data) == {"generated_at", "limit", "notifications", "runs", "conditional_runs", "rate_limit", "errors"}
    assert data["limit"] == 50
    runs = {r["run_id"]: r for r in data["runs"]}
    assert list(runs) == sorted(runs, reverse=True)
    done, running, send = runs[seeded["r504"]], runs[seeded["r505"]], runs[seeded["r510"]]
    assert (done["campaign_id"], done["status"], done["progress"], done["delivered"], done["delivered_as"]) == \
        (700, "done", 100.0, 1490, "granted")
    assert (done["fetched"], done["granted"], done["duplicates_skipped"], done["rejected"], done["failed"]) == \
        (1500, 1490, 0, 7, 3)
    assert (running["progress"], running["settled"], running["in_flight"], running["duplicates_skipped"]) == \
        (25.0, 100, 300, 400)
    assert (send["delivered_as"], send["sent"], send["waiting"], send["in_flight"], send["progress"]) == \
        ("sent", 1, 2, 1, 25.0)
    conditional = data["conditional_runs"]
    assert [r["run_id"] for r in conditional] == [seeded["r5"]]
    flow4 = conditional[0]
    assert (flow4["reported_true"], flow4["reported_false"], flow4["unreported"]) == (10, 2, 3)
    assert 1700 < conditional[0]["time_left_seconds"] <= 1800 and conditional[0]["deadline"]
    assert done["unreported"] is None and done["time_left_seconds"] is None
    assert {r["run_id"] for r in data["errors"]["runs"]} == {seeded["r505"]}
    assert [n["id"] for n in data["errors"]["notifications"]] == [seeded["n11"]]
    assert [n["id"] for n in data["notifications"]] == sorted(
        (v for k, v in seeded.items() if k.startswith("n")), reverse=True)
    assert all("raw_body" not in n and "payload" not in n for n in data["notifications"])
    assert data["rate_limit"]["available"] and data["rate_limit"]["limit"] == 50


def test_rate_limit_waits_of_every_limiter_add_up_on_the_overview(client, settings, seeded):
    import redis

    from shared.optimove.limiter import RateLimiter
    from shared.settings import RateLimit, Secret

    r = redis.Redis.from_url(settings.redis_url)
    limiters = [RateLimiter(r, Secret("sim-api-key"), RateLimit(1, 30.0)) for _ in range(2)]
    assert limiters[0].try_acquire() == 0.0
    waits = [limiters[0].try_acquire(), limiters[1].try_acquire(), limiters[1].try_acquire(priority=True)]
    assert all(w > 0 for w in waits)
    rl = client.get("/api/overview", auth=AUTH).json["rate_limit"]
    assert (rl["count"], rl["recent_count"], rl["priority_count"]) == (3, 3, 1)
    assert rl["seconds"] == pytest.approx(sum(waits), abs=0.01)
    assert rl["max_seconds"] == pytest.approx(max(waits), abs=0.01) and rl["last_at"]
    html = _text(client.get("/admin", auth=AUTH))
    section = html[html.index('id="rate-limit"'):html.index('id="errors"')]
    assert "<b>3</b> waits" in section and "1 of status reports" in section


def test_campaign_page_shows_runs_and_filtered_ledger_rows(client, seeded):
    html = _text(client.get("/admin/campaigns/700", auth=AUTH))
    assert "Campaign 700" in html and "#%d" % seeded["r504"] in html and "#%d" % seeded["r505"] in html
    for customer in ("C1", "C2", "C3", "C4", "C5", "C6"):  # grants is the default ledger here
        assert f"<td>{customer}</td>" in html
    assert "failed · 2" in html and "granted · 2" in html
    failed = _text(client.get("/admin/campaigns/700?ledger=grants&status=failed", auth=AUTH))
    assert "<td>C4</td>" in failed and "<td>C5</td>" in failed
    assert "<td>C1</td>" not in failed and "<td>C3</td>" not in failed
    sends = _text(client.get("/admin/campaigns/701", auth=AUTH))  # sends: its only ledger
    assert "<td>S2</td>" in sends and "Template" in sends and "2030-01-01 10:00:00" in sends
    waiting = _text(client.get("/admin/campaigns/701?ledger=sends&status=waiting", auth=AUTH))
    assert "<td>S2</td>" in waiting and "<td>S1</td>" not in waiting
    paged = _text(client.get("/admin/campaigns/700?ledger=grants&limit=2", auth=AUTH))
    assert "<td>C6</td>" in paged and "<td>C4</td>" not in paged and "older »" in paged


def test_ledger_json_filters_and_pages(client, seeded):
    page = client.get("/api/campaigns/700/ledger?ledger=grants&status=failed", auth=AUTH).json
    assert set(page) == {"campaign_id", "ledger", "status", "limit", "offset", "before", "has_more", "next_before",
                         "rows"}
    assert [r["customer_id"] for r in page["rows"]] == ["C5", "C4"] and not page["has_more"]
    assert set(page["rows"][0]) == {"id", "run_id", "notification_id", "channel_id", "customer_id", "promo_code",
                                    "source", "status", "attempts", "reference", "reason", "created_at", "updated_at"}
    first = client.get("/api/campaigns/700/ledger?limit=4", auth=AUTH).json  # grants by default
    assert [r["customer_id"] for r in first["rows"]] == ["C6", "C5", "C4", "C3"] and first["has_more"]
    rest = client.get(f"/api/campaigns/700/ledger?limit=4&before={first['next_before']}", auth=AUTH).json
    assert [r["customer_id"] for r in rest["rows"]] == ["C2", "C1"] and rest["next_before"] is None
    offset = client.get("/api/campaigns/700/ledger?limit=2&offset=2", auth=AUTH).json
    assert [r["customer_id"] for r in offset["rows"]] == ["C4", "C3"]
    sends = client.get("/api/campaigns/701/ledger?ledger=sends&status=waiting", auth=AUTH).json
    assert [r["customer_id"] for r in sends["rows"]] == ["S3", "S2"] and sends["rows"][0]["template_id"] == 14
    assert sends["rows"][0]["scheduled_time"].startswith("2030-01-01T10:00:00")
    assert client.get("/api/campaigns/701/ledger?ledger=revokes", auth=AUTH).json["rows"] == []


def test_recent_runs_and_notifications_json(client, seeded):
    runs = client.get("/api/campaigns", auth=AUTH).json
    assert [r["run_id"] for r in runs["runs"]] == sorted((seeded[k] for k in ("r504", "r505", "r510", "r5")),
                                                         reverse=True)
    running = client.get("/api/campaigns?status=running&limit=2", auth=AUTH).json
    assert (running["limit"], running["status"]) == (2, "running")
    assert [r["run_id"] for r in running["runs"]] == [seeded["r5"], seeded["r510"]]
    failed = client.get("/api/notifications?status=failed", auth=AUTH).json
    assert [n["id"] for n in failed["notifications"]] == [seeded["n11"]]
    assert SCRIPT in failed["notifications"][0]["last_error"]  # JSON carries the text as it is
    thirteen = client.get("/api/notifications?event=13&campaign=700", auth=AUTH).json["notifications"]
    assert [n["id"] for n in thirteen] == [seeded["n505"], seeded["n504"]]
    assert set(thirteen[0]) == {"id", "event_type", "campaign_id", "channel_id", "dedupe_key", "status", "attempts",
                                "last_error", "received_at", "updated_at", "processed_at"}


def test_campaign_status_keeps_its_shape_and_adds_progress(client, seeded):
    data = client.get("/api/campaigns/700", auth=AUTH).json
    assert {"campaign_id", "status", "runs", "totals", "ledger", "ledgers"} <= set(data)
    assert data["status"] == "running" and data["known"] is True
    assert data["totals"]["fetched"] == 2300 and data["ledger"] == {"granted": 2, "rejected": 1, "failed": 2,
                                                                    "claimed": 1}
    run = data["runs"][0]
    for key in ("run_id", "notification_id", "flow", "channel_id", "status", "cursor", "pages_fetched", "fetch_done",
                "fetched", "claimed", "duplicates_skipped", "granted", "sent", "rejected", "failed", "waiting",
                "attempts", "last_error", "created_at", "finished_at", "seconds", "metrics_reported_at",
                "metrics_error", "deadline", "reported_true", "reported_false", "expired", "revoked", "cancelled",
                "progress", "delivered", "settled", "in_flight", "campaign_id"):
        assert key in run, key
    assert run["seconds"] == 12.0 and run["progress"] == 100.0
    unknown = client.get("/api/campaigns/424242", auth=AUTH).json
    assert (unknown["status"], unknown["known"], unknown["runs"]) == ("unknown", False, [])


def test_unknown_campaign_is_a_page_saying_so(client, seeded):
    page = client.get("/admin/campaigns/424242", auth=AUTH)
    assert page.status_code == 404 and page.mimetype == "text/html"
    assert "no notification, run or ledger row of campaign 424242" in _text(page)
    assert client.get("/api/campaigns/424242/ledger", auth=AUTH).status_code == 404
    assert client.get("/admin/campaigns/99999999999999999999", auth=AUTH).status_code == 404
    assert client.get("/admin/campaigns?id=700", auth=AUTH).headers["Location"].endswith("/admin/campaigns/700")


@pytest.mark.parametrize("url, names", [
    ("/admin/campaigns/700?ledger=bogus", "grants, sends, revokes"),
    ("/admin/campaigns/700?ledger=grants&status=lost", "claimed, granted, rejected, failed, expired"),
    ("/admin/campaigns/700?limit=ten", "limit: expected an integer"),
    ("/admin?limit=1.5", "limit: expected an integer"),
    ("/admin/campaigns?id=abc", "id: expected an integer"),
])
def test_bad_filters_on_pages_are_400_naming_what_is_allowed(client, seeded, url, names):
    response = client.get(url, auth=AUTH)
    assert response.status_code == 400 and response.mimetype == "text/html"
    assert names in _text(response)


def test_a_status_of_another_ledger_finds_no_rows(client, seeded):
    """`status` is checked against every ledger's statuses: one of another ledger is a filter that finds nothing."""
    page = client.get("/api/campaigns/701/ledger?ledger=revokes&status=waiting", auth=AUTH)
    assert page.status_code == 200 and page.json["rows"] == [], page.json


@pytest.mark.parametrize("url, message", [
    ("/api/campaigns/700/ledger?ledger=bogus", "ledger: unknown value 'bogus'; allowed: grants, sends, revokes"),
    ("/api/campaigns/700/ledger?status=lost", "status: unknown value 'lost'; allowed: claimed, granted"),
    ("/api/campaigns/700/ledger?offset=-1", "offset: expected an integer between 0 and 100000"),
    ("/api/campaigns/700/ledger?offset=100001", "use before=<id> to page further"),
    ("/api/campaigns/700/ledger?before=0", "before: expected an integer between 1 and"),
    ("/api/campaigns?status=finished", "allowed: running, done, failed, cancelled, deadline_missed"),
    ("/api/campaigns?limit=%D9%A3", "limit: expected an integer"),  # an Arabic-Indic digit is not an integer here
    ("/api/notifications?status=lost", "allowed: received, processing, done, ignored, failed"),
    ("/api/notifications?event=13.0", "event: expected an integer between 0 and 2147483647"),
    ("/api/notifications?campaign=x", "campaign: expected an integer"),
    ("/api/overview?limit=", None),  # empty counts as unset
])
def test_bad_query_values_are_400_with_a_clear_message(client, seeded, url, message):
    response = client.get(url, auth=AUTH)
    if message is None:
        assert response.status_code == 200
        return
    assert response.status_code == 400, response.json
    assert response.json["status"] == "error" and message in response.json["error"], response.json


@pytest.mark.parametrize("given, used", [("0", 1), ("-5", 1), ("1", 1), ("499", 499), ("501", 500),
                                         ("100000000000000000000000", 500), (None, 50)])
def test_limits_clamp_to_1_to_500(client, seeded, given, used):
    suffix = "" if given is None else f"?limit={given}"
    assert client.get(f"/api/campaigns{suffix}", auth=AUTH).json["limit"] == used
    assert client.get(f"/api/notifications{suffix}", auth=AUTH).json["limit"] == used
    assert client.get(f"/api/overview{suffix}", auth=AUTH).json["limit"] == used
