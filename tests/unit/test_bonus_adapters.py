"""Bonus adapters: HttpBonusAdapter against a real local HTTP server, the fake, the loader."""
from __future__ import annotations

import hashlib
import json
import socket
import time

import pytest

from shared.adapters import bonus, http
from shared.adapters.bonus import (FakeBonusAdapter, GrantItem, GrantResult, HttpBonusAdapter,
                                   idempotency_key, load_bonus_adapter)
from shared.settings import Secret, Settings
from tests.stub_server import StubServer

AUTH = "Authorization: Bearer bonus-SECRET-token"


class Server(StubServer):
    """A scripted bonus system: `reply(request)` returns (status, JSON body or bytes); JSON request bodies."""

    def __init__(self, path: str = "/grants"):
        super().__init__(path)
        self.reply = lambda req: (200, {"results": []})

    def handle(self, req: dict) -> tuple[int, dict, bytes]:
        req["body"] = json.loads(req["body"] or b"null")
        status, body = super().handle(req)
        raw = body if isinstance(body, bytes) else json.dumps(body).encode()
        return status, {"Content-Type": "application/json"}, raw


@pytest.fixture
def server():
    srv = Server()
    yield srv
    srv.close()


def items(n, campaign=7, code="WB23"):
    return [GrantItem(idempotency_key(campaign, f"C{i}", code), campaign, 504, f"C{i}", code, "scheduled")
            for i in range(n)]


def grant_all(req):
    return 200, {"results": [{"idempotency_key": g["idempotency_key"], "status": "granted",
                              "reference": f"ref-{g['customer_id']}"} for g in req["body"]["grants"]]}


# --- idempotency keys -------------------------------------------------------------------------

def test_idempotency_key_is_deterministic_and_distinct():
    key = idempotency_key(1359, "C234638", "WB23")
    assert key == idempotency_key(1359, "C234638", "WB23")
    assert key.startswith("relay-") and len(key) == len("relay-") + 40
    assert key == "relay-" + hashlib.sha256("1359\x1fC234638\x1fWB23".encode()).hexdigest()[:40]
    triples = [(1, "2", "3"), (12, "", "3"), (1, "23", ""), (1, "2", "4"), (2, "2", "3")]
    assert len({idempotency_key(*t) for t in triples}) == len(triples)


def test_idempotency_key_pinned_value_never_changes():
    # Rows granted before a deploy must keep their keys after it, or retries grant twice.
    assert idempotency_key(175777, "C000123", "WB23") == "relay-2772ac5ba142ab5f469f9dfd40f204357a3bd5e6"


# --- batch mode -------------------------------------------------------------------------------

def test_batch_chunks_at_batch_size_and_sends_auth(server):
    server.reply = grant_all
    adapter = HttpBonusAdapter(server.url, batch_size=4, auth_header=Secret(AUTH))
    batch = items(10)
    results = adapter.grant(batch)
    adapter.close()
    assert sorted(len(r["body"]["grants"]) for r in server.requests) == [2, 4, 4]
    assert [r.idempotency_key for r in results] == [i.idempotency_key for i in batch]
    assert all(r.status == "granted" for r in results)
    assert results[3].reference == "ref-C3"
    first = server.requests[0]
    assert first["headers"]["authorization"] == "Bearer bonus-SECRET-token"
    assert first["headers"]["content-type"] == "application/json"
    assert set(first["body"]["grants"][0]) == {"idempotency_key", "campaign_id", "channel_id",
                                               "customer_id", "promo_code", "source", "notification_id"}
    assert first["body"]["grants"][0]["notification_id"] is None


def test_batch_missing_and_unknown_results_are_retry(server):
    def reply(req):
        grants = req["body"]["grants"]
        return 200, {"results": [
            {"idempotency_key": grants[0]["idempotency_key"], "status": "granted"},
            {"idempotency_key": grants[1]["idempotency_key"], "status": "rejected", "reason": "blocked"},
            {"idempotency_key": grants[2]["idempotency_key"], "status": "maybe"},
        ]}
    server.reply = reply
    adapter = HttpBonusAdapter(server.url)
    results = adapter.grant(items(4))
    assert [r.status for r in results] == ["granted", "rejected", "retry", "retry"]
    assert results[1].reason == "blocked"
    assert "unknown status" in results[2].reason
    assert results[3].reason == "no result in reply"


@pytest.mark.parametrize("status", [503, 500, 429, 408])
def test_batch_whole_call_temporary_failure_is_retry(server, status):
    server.reply = lambda req: (status, {"error": "down"})
    results = HttpBonusAdapter(server.url).grant(items(3))
    assert {r.status for r in results} == {"retry"}
    assert all(str(status) in r.reason for r in results)


def test_batch_non_json_reply_is_retry(server):
    server.reply = lambda req: (200, b"<html>proxy</html>")
    results = HttpBonusAdapter(server.url).grant(items(2))
    assert {r.status for r in results} == {"retry"}


def test_batch_400_rejects_every_item_with_status_and_body(server):
    server.reply = lambda req: (400, {"error": "bad campaign"})
    results = HttpBonusAdapter(server.url).grant(items(3))
    assert {r.status for r in results} == {"rejected"}
    assert "400" in results[0].reason and "bad campaign" in results[0].reason


def test_connection_error_is_retry_and_secret_not_in_reason():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    adapter = HttpBonusAdapter(f"http://127.0.0.1:{port}/grants", auth_header=Secret(AUTH), timeout=1.0)
    results = adapter.grant(items(2))
    assert {r.status for r in results} == {"retry"}
    assert all("SECRET" not in r.reason for r in results)


def test_secret_echoed_by_server_is_redacted(server):
    server.reply = lambda req: (401, {"got": req["headers"]["authorization"]})
    results = HttpBonusAdapter(server.url, auth_header=Secret(AUTH)).grant(items(1))
    assert results[0].status == "rejected"
    assert "SECRET" not in results[0].reason
    assert "SECRET" not in repr(HttpBonusAdapter(server.url, auth_header=Secret(AUTH)))


# --- single mode ------------------------------------------------------------------------------

def test_single_mode_status_mapping(server):
    outcomes = {"C0": (201, {"reference": "R-0"}), "C1": (409, {"reference": "R-old"}),
                "C2": (422, {"error": "customer blocked"}), "C3": (503, b"busy"), "C4": (200, b"")}
    server.reply = lambda req: outcomes[req["body"]["customer_id"]]
    adapter = HttpBonusAdapter(server.url, mode="single", concurrency=4)
    results = adapter.grant(items(5))
    adapter.close()
    assert [r.status for r in results] == ["granted", "granted", "rejected", "retry", "granted"]
    assert results[0].reference == "R-0" and results[1].reference == "R-old"
    assert "422" in results[2].reason and "customer blocked" in results[2].reason
    assert results[4].reference is None


def test_single_mode_timeout_is_retry(server):
    def slow(req):
        time.sleep(1.0)
        return 201, {}
    server.reply = slow
    adapter = HttpBonusAdapter(server.url, mode="single", timeout=0.2)
    results = adapter.grant(items(1))
    adapter.close()
    assert results[0].status == "retry" and "timed out" in results[0].reason


def test_single_mode_idempotency_header_matches_body_and_is_stable(server):
    server.reply = lambda req: (201, {})
    adapter = HttpBonusAdapter(server.url, mode="single", auth_header=Secret(AUTH))
    adapter.grant(items(3))
    adapter.grant(items(3))
    adapter.close()
    assert len(server.requests) == 6
    for req in server.requests:
        assert req["headers"]["idempotency-key"] == req["body"]["idempotency_key"]
        assert req["headers"]["authorization"] == "Bearer bonus-SECRET-token"
    keys = [r["headers"]["idempotency-key"] for r in server.requests]
    assert sorted(keys[:3]) == sorted(keys[3:]) and len(set(keys)) == 3


def test_single_mode_runs_concurrently(server):
    def slow(req):
        time.sleep(0.2)
        return 201, {}
    server.reply = slow
    adapter = HttpBonusAdapter(server.url, mode="single", concurrency=8)
    started = time.monotonic()
    results = adapter.grant(items(16))
    elapsed = time.monotonic() - started
    adapter.close()
    assert all(r.status == "granted" for r in results)
    assert server.max_in_flight > 1
    assert server.max_in_flight <= 8
    assert elapsed < 16 * 0.2 / 2


def test_close_shuts_down_executor_and_pool_sized_for_concurrency(server):
    adapter = HttpBonusAdapter(server.url, mode="single", concurrency=12)
    assert adapter._session.get_adapter(server.url)._pool_maxsize == 12
    server.reply = lambda req: (201, {})
    adapter.grant(items(2))
    executor = adapter._executor
    adapter.close()
    assert executor is not None and executor._shutdown
    assert adapter._executor is None


# --- fake -------------------------------------------------------------------------------------

def test_fake_honours_idempotency_rejections_and_script():
    fake = FakeBonusAdapter()
    batch = items(3)
    fake.reject_code("BAD", "no such promo")
    fake.queue("retry")
    first = fake.grant(batch)
    assert [r.status for r in first] == ["retry", "granted", "granted"]
    again = fake.grant(batch)
    assert [r.status for r in again] == ["granted"] * 3
    assert again[1].reference == first[1].reference
    assert len(fake.applied) == 3 and len(fake.calls) == 2
    bad = GrantItem(idempotency_key(7, "C9", "BAD"), 7, None, "C9", "BAD", "realtime")
    assert fake.grant([bad]) == [GrantResult(bad.idempotency_key, "rejected", reason="no such promo")]
    fake.queue(("rejected", "scripted no"))
    assert fake.grant(items(1, code="NEW"))[0].reason == "scripted no"
    fake.close()
    assert fake.closed


# --- loader -----------------------------------------------------------------------------------

def test_load_builtins():
    http = load_bonus_adapter(Settings(bonus_adapter="http", bonus_url="http://bonus.local/g",
                                       bonus_mode="single", bonus_concurrency=3, bonus_auth_header=Secret(AUTH)))
    assert isinstance(http, HttpBonusAdapter) and http.mode == "single" and http.concurrency == 3
    http.close()
    assert isinstance(load_bonus_adapter(Settings(bonus_adapter="fake")), FakeBonusAdapter)


def test_load_http_without_url_names_bonus_url():
    with pytest.raises(ValueError, match="BONUS_URL"):
        load_bonus_adapter(Settings(bonus_adapter="http"))


def test_load_unknown_names_adapter_and_available():
    with pytest.raises(ValueError) as info:
        load_bonus_adapter(Settings(bonus_adapter="nope"))
    assert "'nope'" in str(info.value) and "fake" in str(info.value) and "http" in str(info.value)


class _EntryPoint:
    def __init__(self, name, target):
        self.name, self._target = name, target

    def load(self):
        return self._target


def test_load_from_entry_point(monkeypatch):
    built = []

    def factory(settings):
        built.append(settings)
        return FakeBonusAdapter()

    monkeypatch.setattr(http, "entry_points", lambda group: [_EntryPoint("acme", factory)]
                        if group == bonus.ENTRY_POINT_GROUP else [])
    settings = Settings(bonus_adapter="acme")
    assert isinstance(load_bonus_adapter(settings), FakeBonusAdapter)
    assert built == [settings]
    with pytest.raises(ValueError, match="acme"):
        load_bonus_adapter(Settings(bonus_adapter="other"))
