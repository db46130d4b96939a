"""The listener against real Postgres and Redis: every response code, and nothing changed on refusal."""
from __future__ import annotations

import json
import threading

import pytest

from shared import dispatch
from tests.conftest import TOKEN, count, make_settings, queue_lengths

pytestmark = pytest.mark.integration

URL = f"/optimove/events?token={TOKEN}"

BODIES = {
    1: {"EventTypeID": 1, "TimeStamp": "2026-11-27 09:00:00", "CampaignID": 101},
    2: {"EventTypeID": 2, "TimeStamp": "2026-11-27 23:00:00"},
    3: {"EventTypeID": 3, "TimeStamp": "2026-11-27 23:30"},
    4: {"EventTypeID": 4, "TimeStamp": "2026-11-27 09:00:00", "CampaignID": 104},
    5: {"EventTypeID": 5, "TimeStamp": "2026-11-27 09:00:00", "CampaignID": 105,
        "ClearanceRequiredBy": "2026-11-27 09:30"},
    11: {"campaignID": "111", "channelID": 505, "templateID": 7, "customerID": "C1", "promoCode": ["B1"],
         "eventTypeId": 11},
    13: {"EventTypeID": 13, "TimeStamp": "2026-11-27 05:04:54", "CampaignID": "1111", "ChannelID": 504},
}


@pytest.fixture
def client(settings):
    from web.app import create_app

    app = create_app(settings)
    return app.test_client()


def unchanged(db, redis_url):
    assert count(db, "SELECT count(*) FROM notifications") == 0
    assert sum(queue_lengths(redis_url).values()) == 0


@pytest.mark.parametrize("event_type", sorted(BODIES))
def test_accepts_each_event_type_and_stores_raw_body(client, db, redis_url, event_type):
    raw = json.dumps(BODIES[event_type])
    response = client.post(URL, data=raw, content_type="application/json")
    assert response.status_code == 202, response.json
    assert response.json["status"] == "accepted"
    nid = response.json["notification_id"]
    with db.cursor() as cur:
        cur.execute("SELECT event_type, raw_body, status, payload FROM notifications WHERE id = %s", (nid,))
        event, stored_raw, status, payload = cur.fetchone()
    assert (event, stored_raw, status) == (event_type, raw, "received")
    assert payload == BODIES[event_type]
    queue = dispatch.notification_queue(event_type)
    assert queue_lengths(redis_url)[queue] == 1


@pytest.mark.parametrize("event_type", sorted(BODIES))
def test_duplicate_delivery_stored_once(client, db, redis_url, event_type):
    first = client.post(URL, json=BODIES[event_type])
    second = client.post(URL, json=BODIES[event_type])
    assert first.status_code == 202 and second.status_code == 200
    assert second.json == {"status": "duplicate", "notification_id": first.json["notification_id"]}
    assert count(db, "SELECT count(*) FROM notifications") == 1
    assert sum(queue_lengths(redis_url).values()) == 1


def test_thirteen_dedupes_across_casing_and_string_ids(client, db):
    a = client.post(URL, json={"EventTypeID": 13, "CampaignID": 9, "ChannelID": 504})
    b = client.post(URL, json={"eventTypeId": "13", "campaignId": "9", "channelId": "504", "timeStamp": "2026-01-01 1:00"})
    assert (a.status_code, b.status_code) == (202, 200)
    c = client.post(URL, json={"EventTypeID": 13, "CampaignID": 9, "ChannelID": 505})
    assert c.status_code == 202


def test_twenty_concurrent_identical_posts_make_one_row_and_one_task(settings, db, redis_url):
    from web.app import create_app

    app = create_app(settings)
    codes: list[int] = []
    barrier = threading.Barrier(20)

    def post():
        with app.test_client() as c:
            barrier.wait()
            codes.append(c.post(URL, json=BODIES[13]).status_code)

    threads = [threading.Thread(target=post) for _ in range(20)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(codes) == [200] * 19 + [202]
    assert count(db, "SELECT count(*) FROM notifications") == 1
    assert queue_lengths(redis_url)[dispatch.NOTIFICATIONS] == 1


@pytest.mark.parametrize("url,headers", [
    ("/optimove/events", {}),
    ("/optimove/events?token=wrong-token-wrong-token", {}),
    ("/optimove/events", {"X-Relay-Token": "wrong-token-wrong-token"}),
    ("/optimove/events?token=", {}),
])
def test_missing_or_wrong_token_401(client, db, redis_url, url, headers):
    response = client.post(url, json=BODIES[13], headers=headers)
    assert response.status_code == 401
    assert response.json["error"] == "unauthorized"
    unchanged(db, redis_url)


def test_token_in_header_and_rotation(database_url, redis_url, db):
    from web.app import create_app

    app = create_app(make_settings(DATABASE_URL=database_url, REDIS_URL=redis_url,
                                   RELAY_LISTENER_TOKENS=f"old-token-0123456789, {TOKEN}"))
    c = app.test_client()
    assert c.post("/optimove/events", json=BODIES[1], headers={"X-Relay-Token": TOKEN}).status_code == 202
    assert c.post("/optimove/events?token=old-token-0123456789", json=BODIES[4]).status_code == 202


@pytest.mark.parametrize("body,field", [
    ("{not json", "_body"),
    ("[1, 2]", "_schema"),
    (json.dumps({"EventTypeID": 13, "CampaignID": 1}), "ChannelID"),
    (json.dumps({"EventTypeID": 13, "CampaignID": "x1", "ChannelID": 5}), "CampaignID"),
    (json.dumps({"EventTypeID": 99, "CampaignID": 1}), "EventTypeID"),
    (json.dumps({"CampaignID": 1}), "EventTypeID"),
    (json.dumps({"EventTypeID": 5, "CampaignID": 1, "ClearanceRequiredBy": "tomorrow"}), "ClearanceRequiredBy"),
    (b"\xff\xfe".decode("latin-1"), "_body"),
    ('{"EventTypeID": 13, "CampaignID": 1, "ChannelID": 5, "x": NaN}', "_body"),
    ('{"EventTypeID": 13, "CampaignID": 1, "ChannelID": 5, "x": Infinity}', "_body"),
    ('{"EventTypeID": 13, "CampaignID": 1, "ChannelID": 5, "x": "a\\u0000b"}', "_body"),
])
def test_bad_body_400_with_field_errors(client, db, redis_url, body, field):
    response = client.post(URL, data=body.encode("latin-1") if "\xff" in body else body,
                           content_type="application/json")
    assert response.status_code == 400, response.json
    assert field in response.json["fields"], response.json
    unchanged(db, redis_url)


@pytest.mark.parametrize("method", ["get", "put", "delete", "patch"])
def test_non_post_405(client, db, redis_url, method):
    response = getattr(client, method)(URL)
    assert response.status_code == 405
    assert response.json["error"] == "method not allowed"
    unchanged(db, redis_url)


def test_too_large_413(database_url, redis_url, db):
    from web.app import create_app

    app = create_app(make_settings(DATABASE_URL=database_url, REDIS_URL=redis_url, RELAY_MAX_BODY_BYTES=1024))
    body = dict(BODIES[13], padding="x" * 2000)
    response = app.test_client().post(URL, json=body)
    assert response.status_code == 413
    assert "too large" in response.json["error"]
    unchanged(db, redis_url)


def test_default_limit_is_one_mebibyte(client, db, redis_url):
    body = dict(BODIES[13], padding="x" * (1024 * 1024))
    assert client.post(URL, json=body).status_code == 413
    unchanged(db, redis_url)


@pytest.mark.parametrize("content_type", ["text/plain", "application/x-www-form-urlencoded", "application/xml"])
def test_non_json_content_type_415(client, db, redis_url, content_type):
    response = client.post(URL, data=json.dumps(BODIES[13]), content_type=content_type)
    assert response.status_code == 415
    unchanged(db, redis_url)


def test_json_with_charset_accepted(client):
    response = client.post(URL, data=json.dumps(BODIES[13]), content_type="application/json; charset=utf-8")
    assert response.status_code == 202


def test_event_type_from_listener_url(client, db):
    response = client.post(URL + "&EventTypeID=13", json={"CampaignID": 5, "ChannelID": 504})
    assert response.status_code == 202
    assert count(db, "SELECT event_type FROM notifications") == 13


def test_postgres_unreachable_503_and_nothing_enqueued(redis_url):
    from cli.embedded import free_port
    from web.app import create_app

    dead = f"postgresql://postgres@127.0.0.1:{free_port()}/relay"
    app = create_app(make_settings(DATABASE_URL=dead, REDIS_URL=redis_url))
    response = app.test_client().post(URL, json=BODIES[13])
    assert response.status_code == 503
    assert "database unavailable" in response.json["error"]
    assert sum(queue_lengths(redis_url).values()) == 0


def test_a_kept_connection_killed_under_the_listener_is_replaced_and_nothing_is_lost(settings, db, redis_url):
    """Postgres ends the listener's kept connection (a restart, a failover, an idle timeout): the next
    notification is stored on a new connection in the same request, not answered 503."""
    from web.app import create_app

    app = create_app(settings)
    client = app.test_client()
    first = client.post(URL, json=BODIES[13])
    assert first.status_code == 202
    with app.extensions["listener_db"].autocommit() as conn:
        pid = conn.get_backend_pid()
    with db.cursor() as cur:
        cur.execute("SELECT pg_terminate_backend(%s)", (pid,))
        assert cur.fetchone()[0]
    second = client.post(URL, json={**BODIES[13], "CampaignID": "2222"})
    assert second.status_code == 202, second.json
    with app.extensions["listener_db"].autocommit() as conn:
        assert conn.get_backend_pid() != pid
    assert count(db, "SELECT count(*) FROM notifications") == 2
    assert queue_lengths(redis_url)[dispatch.notification_queue(13)] == 2


def test_readyz_names_the_store_that_is_down(database_url, redis_url, db):
    from cli.embedded import free_port
    from web.app import create_app

    ok = create_app(make_settings(DATABASE_URL=database_url, REDIS_URL=redis_url)).test_client()
    assert ok.get("/readyz").status_code == 200
    assert ok.get("/healthz").json == {"status": "ok"}
    no_redis = create_app(make_settings(DATABASE_URL=database_url,
                                        REDIS_URL=f"redis://127.0.0.1:{free_port()}/0")).test_client()
    response = no_redis.get("/readyz")
    assert response.status_code == 503 and response.json["error"] == "redis is unreachable"
    no_pg = create_app(make_settings(DATABASE_URL=f"postgresql://postgres@127.0.0.1:{free_port()}/x",
                                     REDIS_URL=redis_url)).test_client()
    response = no_pg.get("/readyz")
    assert response.status_code == 503 and response.json["error"] == "postgres is unreachable"


def test_metrics_exposes_inbox_counts_and_latency(client):
    client.post(URL, json=BODIES[13])
    client.post(URL, json=BODIES[2])
    text = client.get("/metrics").get_data(as_text=True)
    assert 'relay_notifications{event_type="13",status="received"} 1.0' in text
    assert 'relay_notifications{event_type="2",status="received"} 1.0' in text
    assert "relay_listener_latency_seconds_bucket" in text


def test_api_requires_basic_auth(client):
    assert client.get("/api/campaigns/1").status_code == 401
    assert client.get("/api/campaigns/1", auth=("admin", "wrong")).status_code == 401
    response = client.get("/api/campaigns/1", auth=("admin", "admin-password-for-tests"))
    assert response.status_code == 200 and response.json["status"] == "unknown"


def test_postgres_restart_costs_no_request(redis_url, tmp_path):
    """Pooled connections die with a Postgres restart; the listener retries once instead of answering 503."""
    from cli.embedded import EmbeddedPostgres
    from shared.db import upgrade
    from web.app import create_app

    pg = EmbeddedPostgres(tmp_path / "pg")
    try:
        upgrade(pg.start())
        app = create_app(make_settings(DATABASE_URL=pg.url, REDIS_URL=redis_url))
        client = app.test_client()
        assert client.post(URL, json=BODIES[1]).status_code == 202
        pg.stop()
        pg.start()  # the pooled connection is now dead
        assert client.post(URL, json=BODIES[4]).status_code == 202
        pg.stop()
        assert client.post(URL, json=BODIES[13]).status_code == 503  # down: nothing acknowledged
        pg.start()
        assert client.post(URL, json=BODIES[13]).status_code == 202
    finally:
        pg.stop()


@pytest.mark.parametrize("depth", [900, 5_000, 50_000])
def test_deeply_nested_json_is_refused_or_stored_never_a_500(client, db, redis_url, depth):
    """50,000 nested arrays used to be answered 500 (the parser's recursion); now it is a 400 that
    changes nothing. A nesting the parser can read is stored like any other unknown key."""
    body = '{"EventTypeID": 13, "CampaignID": 1, "ChannelID": 504, "extra": ' + "[" * depth + "]" * depth + "}"
    response = client.post(URL, data=body, content_type="application/json")
    bare = client.post(URL, data="[" * depth + "]" * depth, content_type="application/json")
    assert bare.status_code == 400, bare.json
    if response.status_code == 400:
        assert response.json["fields"]["_body"] == ["JSON nested too deeply"]
        unchanged(db, redis_url)
    else:
        assert response.status_code == 202 and depth < 1000, response.json


def test_an_unpaired_surrogate_escape_is_stored_not_a_500(client, db, redis_url):
    """`"\\ud8ba"` is valid JSON that jsonb cannot hold: it used to be a 500 (found by schemathesis).
    The raw body keeps it as received; the payload and the parsed fields carry U+FFFD instead."""
    raw = '{"EventTypeID": 11, "CampaignID": 7, "CustomerID": "C\\ud8ba1", "note": "\\udf81 \\ud83d\\ude00"}'
    response = client.post(URL, data=raw, content_type="application/json")
    assert response.status_code == 202, response.json
    with db.cursor() as cur:
        cur.execute("SELECT raw_body, payload FROM notifications WHERE id = %s", (response.json["notification_id"],))
        raw_body, payload = cur.fetchone()
    assert raw_body == raw
    assert payload["CustomerID"] == "C\ufffd1" and payload["note"] == "\ufffd \U0001F600"
    assert sum(queue_lengths(redis_url).values()) == 1
