"""Abuse of the listener on a real `relay web` (gunicorn, real Postgres and Redis).

Missing, wrong and rotated tokens; bodies of 1 MiB + 1 byte; deeply nested JSON; wrong content
types; bytes that are not UTF-8; and a flood of 10,000 distinct junk requests: each is answered
4xx, nothing is stored and nothing is enqueued, and a valid notification sent in the middle of the
flood is accepted within 1 s.
"""
from __future__ import annotations

import http.client
import itertools
import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from urllib.parse import urlsplit

import pytest

from tests.conftest import TOKEN, count, queue_lengths
from tests.harness import relay_env

pytestmark = pytest.mark.faults

MIB = 1024 * 1024
PATH = "/optimove/events"
VALID = {"EventTypeID": 13, "TimeStamp": "2026-11-27 10:00:00", "CampaignID": 1, "ChannelID": 504}


def junk(i: int) -> tuple[str, dict[str, str], bytes, int]:
    """The i-th junk request: (path, headers, body, expected status). Every one is distinct."""
    json_ct = {"Content-Type": "application/json"}
    token = {"X-Relay-Token": TOKEN}
    body = json.dumps({**VALID, "CampaignID": 10_000 + i}).encode()
    kind = i % 12
    if kind == 0:
        return PATH, json_ct, body, 401  # no token
    if kind == 1:
        return PATH, {**json_ct, "X-Relay-Token": f"wrong-{i}"}, body, 401
    if kind == 2:
        return f"{PATH}?token=wrong-{i}", json_ct, body, 401
    if kind == 3:
        return PATH, {**json_ct, **token}, b"{" * (i % 50 + 1), 400  # not JSON
    if kind == 4:
        return PATH, {**json_ct, **token}, b'{"EventTypeID": 13, "x": "\xff\xfe' + str(i).encode() + b'"}', 400
    if kind == 5:
        return PATH, {"Content-Type": "text/plain", **token}, body, 415
    if kind == 6:
        return PATH, {"Content-Type": "application/x-www-form-urlencoded", **token}, b"a=%d" % i, 415
    if kind == 7:
        depth = 5_000 + i
        return PATH, {**json_ct, **token}, b"[" * depth + b"]" * depth, 400
    if kind == 8:
        return PATH, {**json_ct, **token}, json.dumps({"EventTypeID": 99, "n": i}).encode(), 400
    if kind == 9:
        return PATH, {**json_ct, **token}, json.dumps({"EventTypeID": 13, "CampaignID": i}).encode(), 400
    if kind == 10:
        return PATH, {**json_ct, **token}, json.dumps([i, "not an object"]).encode(), 400
    return PATH, {**json_ct, **token}, json.dumps({**VALID, "CampaignID": -i - 1}).encode(), 400


def post(conn: http.client.HTTPConnection, path: str, headers: dict, body: bytes) -> int:
    conn.request("POST", path, body=body, headers=headers)
    response = conn.getresponse()
    response.read()
    return response.status


@pytest.fixture
def web(procs, database_url, db, redis_url):
    return procs.web(relay_env(database_url, redis_url, RELAY_LISTENER_TOKENS=f"{TOKEN},second-token-0123456789"))


def connect(base: str) -> http.client.HTTPConnection:
    parts = urlsplit(base)
    return http.client.HTTPConnection(parts.hostname, parts.port, timeout=10)


def test_tokens_sizes_types_and_encodings_are_refused_and_change_nothing(web, db, redis_url):
    """Missing, truncated, extended and empty tokens; 1 MiB + 1 byte; text/plain and no content type;
    invalid UTF-8; 50,000 nested arrays; NaN: each refused 4xx with nothing stored or enqueued; both
    tokens of a rotation accepted."""
    conn = connect(web)
    body = json.dumps(VALID).encode()
    cases = [
        (PATH, {"Content-Type": "application/json"}, body, 401),
        (PATH, {"Content-Type": "application/json", "X-Relay-Token": TOKEN[:-1]}, body, 401),
        (PATH, {"Content-Type": "application/json", "X-Relay-Token": TOKEN + "x"}, body, 401),
        (f"{PATH}?token=", {"Content-Type": "application/json"}, body, 401),
        (PATH, {"Content-Type": "application/json", "X-Relay-Token": TOKEN},
         b'{"x": "' + b"a" * (MIB + 1 - 9) + b'"}', 413),  # 1 MiB + 1 byte
        (PATH, {"Content-Type": "text/plain", "X-Relay-Token": TOKEN}, body, 415),
        (PATH, {"X-Relay-Token": TOKEN}, body, 415),
        (PATH, {"Content-Type": "application/json", "X-Relay-Token": TOKEN}, b"\xc3\x28" + body, 400),
        (PATH, {"Content-Type": "application/json", "X-Relay-Token": TOKEN}, b"[" * 50_000 + b"]" * 50_000, 400),
        (PATH, {"Content-Type": "application/json", "X-Relay-Token": TOKEN}, b'{"EventTypeID": NaN}', 400),
    ]
    for path, headers, payload, expected in cases:
        assert len(payload) != MIB + 1 or expected == 413
        assert post(conn, path, headers, payload) == expected, (path, headers, payload[:60])
        if expected == 413:  # the server may close the connection after refusing a large body
            conn.close()
            conn = connect(web)
    assert count(db, "SELECT count(*) FROM notifications") == 0
    assert sum(queue_lengths(redis_url).values()) == 0

    # rotation: both configured tokens work, in the header or the query string
    assert post(conn, PATH, {"Content-Type": "application/json", "X-Relay-Token": TOKEN}, body) == 202
    rotated = json.dumps({**VALID, "ChannelID": 505}).encode()
    assert post(conn, f"{PATH}?token=second-token-0123456789", {"Content-Type": "application/json"}, rotated) == 202
    assert count(db, "SELECT count(*) FROM notifications") == 2


def test_a_flood_of_10000_junk_requests_stores_nothing_and_a_valid_one_gets_through_within_a_second(
        web, db, redis_url):
    """10,000 distinct junk requests from 8 connections (12 kinds: tokens, JSON, encodings, content types,
    nesting, schema); a valid notification is sent half way through."""
    total, threads = 10_000, 8
    counter = itertools.count()
    statuses: dict[int, int] = {}
    wrong: list[tuple[int, int, int]] = []
    lock = threading.Lock()

    def flood() -> None:
        conn = connect(web)
        while (i := next(counter)) < total:
            path, headers, body, expected = junk(i)
            try:
                status = post(conn, path, headers, body)
            except (http.client.HTTPException, OSError):  # a refused large body may close the connection
                conn.close()
                conn = connect(web)
                status = post(conn, path, headers, body)
            with lock:
                statuses[status] = statuses.get(status, 0) + 1
                if status != expected:
                    wrong.append((i, status, expected))
        conn.close()

    started = time.monotonic()
    with ThreadPoolExecutor(threads) as pool:
        futures = [pool.submit(flood) for _ in range(threads)]
        while sum(statuses.values()) < total // 2 and not all(f.done() for f in futures):  # half way through
            time.sleep(0.01)
        valid = connect(web)
        sent = time.monotonic()
        assert post(valid, PATH, {"Content-Type": "application/json", "X-Relay-Token": TOKEN},
                    json.dumps(VALID).encode()) == 202
        accepted_in = time.monotonic() - sent
        for future in futures:
            future.result()
    seconds = time.monotonic() - started
    print(f"flood: {total} junk requests in {seconds:.1f}s ({total / seconds:.0f}/s), statuses {statuses}, "
          f"valid notification accepted in {accepted_in * 1000:.0f} ms")
    assert not wrong, wrong[:10]
    assert sum(statuses.values()) == total and all(400 <= s < 500 for s in statuses)
    assert accepted_in < 1.0
    assert count(db, "SELECT count(*) FROM notifications") == 1  # only the valid one
    assert sum(queue_lengths(redis_url).values()) == 1
