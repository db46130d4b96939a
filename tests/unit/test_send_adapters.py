"""Send adapters: HttpSendAdapter against a real local HTTP server, the log and fake adapters, the loader."""
from __future__ import annotations

import logging
import socket
import time
import tomllib
from pathlib import Path

import pytest

from shared.adapters import http, send
from shared.adapters.bonus import GrantResult, idempotency_key
from shared.adapters.http import ItemResult
from shared.adapters.send import (FakeSendAdapter, HttpSendAdapter, LogSendAdapter, SendItem, SendResult,
                                  load_send_adapter)
from shared.settings import Secret, Settings
from tests.unit.test_bonus_adapters import Server, _EntryPoint

AUTH = "X-Api-Key: send-SECRET-token"
EMAIL = "jane.doe@example.com"


@pytest.fixture
def server():
    srv = Server("/sends")
    yield srv
    srv.close()


def sends(n, campaign=7, template=3, notification_id=None):
    return [SendItem(idempotency_key(campaign, 510, template, f"C{i}"), campaign, 510, template, f"C{i}",
                     {"Email": EMAIL, "FirstName": "Jane"}, ["WB23"], "2024-05-01T10:00:00Z", "scheduled",
                     notification_id) for i in range(n)]


def send_all(req):
    return 200, {"results": [{"idempotency_key": s["idempotency_key"], "status": "sent",
                              "reference": f"msg-{s['customer_id']}"} for s in req["body"]["sends"]]}


def slowly(seconds, reply):
    """`reply`, answered after `seconds`."""
    def slow(req):
        time.sleep(seconds)
        return reply(req)
    return slow


def refused_url() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{s.getsockname()[1]}/sends"


# --- items and results ------------------------------------------------------------------------

def test_send_item_json_has_exactly_the_documented_keys():
    item = sends(1, notification_id=42)[0]
    assert item.to_json() == {
        "idempotency_key": item.idempotency_key, "campaign_id": 7, "channel_id": 510, "template_id": 3,
        "customer_id": "C0", "attributes": {"Email": EMAIL, "FirstName": "Jane"}, "promo_codes": ["WB23"],
        "scheduled_time": "2024-05-01T10:00:00Z", "source": "scheduled", "notification_id": 42}
    assert sends(1)[0].to_json()["notification_id"] is None


def test_results_are_one_shared_type():
    assert SendResult is ItemResult and GrantResult is ItemResult


def test_idempotency_key_takes_any_number_of_parts():
    assert idempotency_key(7, 510, 3, "C0") != idempotency_key(7, 510, 3)
    assert idempotency_key(7, "C0", "WB23", 99) != idempotency_key(7, "C0", "WB23")
    assert len(idempotency_key(1)) == len("relay-") + 40


# --- batch mode -------------------------------------------------------------------------------

def test_batch_chunks_at_batch_size_and_sends_auth(server):
    server.reply = send_all
    adapter = HttpSendAdapter(server.url, batch_size=4, auth_header=Secret(AUTH))
    batch = sends(10)
    results = adapter.send(batch)
    adapter.close()
    assert sorted(len(r["body"]["sends"]) for r in server.requests) == [2, 4, 4]
    assert [r.idempotency_key for r in results] == [i.idempotency_key for i in batch]
    assert all(r.status == "sent" for r in results)
    assert results[3].reference == "msg-C3"
    # Chunks go out concurrently, so the first chunk is not necessarily the first request.
    first = next(r for r in server.requests if r["body"]["sends"][0]["customer_id"] == "C0")
    assert first["headers"]["x-api-key"] == "send-SECRET-token"
    assert first["headers"]["content-type"] == "application/json"
    assert "idempotency-key" not in first["headers"]
    assert set(first["body"]) == {"sends"}
    assert first["body"]["sends"][0] == batch[0].to_json()


def test_batch_rejected_missing_and_unknown_results(server):
    def reply(req):
        items = req["body"]["sends"]
        return 200, {"results": [
            {"idempotency_key": items[0]["idempotency_key"], "status": "sent", "reference": 17},
            {"idempotency_key": items[1]["idempotency_key"], "status": "rejected", "reason": "unsubscribed"},
            {"idempotency_key": items[2]["idempotency_key"], "status": "granted"},
            {"idempotency_key": items[3]["idempotency_key"], "status": "retry", "reason": "throttled"},
            {"status": "sent"},
        ]}
    server.reply = reply
    results = HttpSendAdapter(server.url).send(sends(5))
    assert [r.status for r in results] == ["sent", "rejected", "retry", "retry", "retry"]
    assert results[0].reference == "17"
    assert results[1].reason == "unsubscribed"
    assert results[2].reason == "unknown status 'granted'"
    assert results[3].reason == "throttled"
    assert results[4].reason == "no result in reply"


@pytest.mark.parametrize("status", [500, 502, 503, 429, 408])
def test_batch_whole_call_temporary_failure_is_retry(server, status):
    server.reply = lambda req: (status, {"error": "down"})
    results = HttpSendAdapter(server.url).send(sends(3))
    assert {r.status for r in results} == {"retry"}
    assert all(f"HTTP {status}" in r.reason for r in results)


@pytest.mark.parametrize("status", [400, 401, 403, 404, 422])
def test_batch_other_4xx_rejects_every_item_with_status_and_body(server, status):
    server.reply = lambda req: (status, {"error": "bad template"})
    results = HttpSendAdapter(server.url).send(sends(3))
    assert {r.status for r in results} == {"rejected"}
    assert f"HTTP {status}" in results[0].reason and "bad template" in results[0].reason


@pytest.mark.parametrize("body", [b"<html>proxy</html>", b"", {"sent": 3}, {"results": 5}, [1, 2]])
def test_batch_malformed_reply_is_retry(server, body):
    server.reply = lambda req: (200, body)
    results = HttpSendAdapter(server.url).send(sends(2))
    assert {r.status for r in results} == {"retry"}
    assert all(r.reason.startswith("HTTP 200: reply is not") for r in results)


def test_batch_timeout_is_retry(server):
    server.reply = slowly(1.0, send_all)
    results = HttpSendAdapter(server.url, timeout=0.2).send(sends(2))
    assert {r.status for r in results} == {"retry"}
    assert all("timed out after 0.2s" == r.reason for r in results)


@pytest.mark.parametrize("mode", ["batch", "single"])
def test_connection_refused_is_retry_and_secret_not_in_reason(mode):
    adapter = HttpSendAdapter(refused_url(), mode=mode, auth_header=Secret(AUTH), timeout=1.0)
    results = adapter.send(sends(2))
    adapter.close()
    assert {r.status for r in results} == {"retry"}
    assert all("SECRET" not in r.reason for r in results)


@pytest.mark.parametrize("mode", ["batch", "single"])
def test_secret_echoed_by_platform_never_appears_in_reasons(server, mode):
    def echo(req):
        token = req["headers"]["x-api-key"]
        if req["body"].get("sends"):
            return 200, {"results": [{"idempotency_key": s["idempotency_key"], "status": "rejected",
                                      "reason": f"bad key {token}"} for s in req["body"]["sends"]]}
        return 401, {"got": token}
    server.reply = echo
    adapter = HttpSendAdapter(server.url, mode=mode, auth_header=Secret(AUTH))
    results = adapter.send(sends(2))
    adapter.close()
    assert {r.status for r in results} == {"rejected"}
    assert all("SECRET" not in r.reason and "***" in r.reason for r in results)
    assert "SECRET" not in repr(adapter)


def test_batch_server_error_reason_is_redacted(server):
    server.reply = lambda req: (503, {"echo": req["headers"]["x-api-key"]})
    results = HttpSendAdapter(server.url, auth_header=Secret(AUTH)).send(sends(1))
    assert results[0].status == "retry" and "SECRET" not in results[0].reason


# --- single mode ------------------------------------------------------------------------------

def test_single_mode_status_mapping(server):
    outcomes = {"C0": (201, {"reference": "M-0"}), "C1": (409, {"reference": "M-old"}),
                "C2": (422, {"error": "no such template"}), "C3": (503, b"busy"), "C4": (200, b""),
                "C5": (500, {"error": "boom"}), "C6": (429, b""), "C7": (404, b"gone")}
    server.reply = lambda req: outcomes[req["body"]["customer_id"]]
    adapter = HttpSendAdapter(server.url, mode="single", concurrency=4)
    results = adapter.send(sends(8))
    adapter.close()
    assert [r.status for r in results] == ["sent", "sent", "rejected", "retry", "sent", "retry", "retry",
                                           "rejected"]
    assert results[0].reference == "M-0" and results[0].reason is None
    assert results[1].reference == "M-old" and results[1].reason == "already sent"
    assert "HTTP 422" in results[2].reason and "no such template" in results[2].reason
    assert results[4].reference is None
    assert "HTTP 500" in results[5].reason


def test_single_mode_body_headers_and_stable_keys(server):
    server.reply = lambda req: (201, {})
    adapter = HttpSendAdapter(server.url, mode="single", auth_header=Secret(AUTH))
    batch = sends(3)
    adapter.send(batch)
    adapter.send(batch)
    adapter.close()
    assert len(server.requests) == 6
    for req in server.requests:
        assert req["headers"]["idempotency-key"] == req["body"]["idempotency_key"]
        assert req["headers"]["x-api-key"] == "send-SECRET-token"
        assert set(req["body"]) == set(batch[0].to_json())
    keys = [r["headers"]["idempotency-key"] for r in server.requests]
    assert sorted(keys[:3]) == sorted(keys[3:]) and len(set(keys)) == 3


def test_single_mode_timeout_is_retry(server):
    server.reply = slowly(1.0, lambda req: (201, {}))
    adapter = HttpSendAdapter(server.url, mode="single", timeout=0.2)
    results = adapter.send(sends(1))
    adapter.close()
    assert results[0].status == "retry" and "timed out" in results[0].reason


def test_single_mode_runs_concurrently_and_close_stops_threads(server):
    server.reply = slowly(0.2, lambda req: (201, {}))
    adapter = HttpSendAdapter(server.url, mode="single", concurrency=8)
    assert adapter._session.get_adapter(server.url)._pool_maxsize == 8
    results = adapter.send(sends(16))
    executor = adapter._executor
    adapter.close()
    assert all(r.status == "sent" for r in results)
    assert 1 < server.max_in_flight <= 8
    assert executor is not None and executor._shutdown and adapter._executor is None
    assert executor._thread_name_prefix == "send-http"


def test_bad_mode_is_refused():
    with pytest.raises(ValueError, match="send mode must be 'batch' or 'single'"):
        HttpSendAdapter("http://platform.local/sends", mode="bulk")


# --- log adapter ------------------------------------------------------------------------------

def test_log_adapter_logs_one_line_per_item_without_attribute_values(caplog):
    adapter = LogSendAdapter()
    with caplog.at_level(logging.INFO, logger="shared.adapters.send"):
        results = adapter.send(sends(2)) + adapter.send(sends(1, campaign=8, template=4))
    adapter.close()
    assert [r.status for r in results] == ["sent"] * 3
    assert [r.reference for r in results] == ["log-1", "log-2", "log-3"]
    lines = [r for r in caplog.records if r.name == "shared.adapters.send"]
    assert len(lines) == 3 and all(r.levelno == logging.INFO for r in lines)
    text = caplog.text
    assert "campaign=7 channel=510 template=3 customer=C0 source=scheduled" in text
    assert "campaign=8 channel=510 template=4 customer=C0" in text
    assert EMAIL not in text and "Jane" not in text


# --- fake -------------------------------------------------------------------------------------

def test_fake_honours_idempotency_rejections_and_script():
    fake = FakeSendAdapter()
    batch = sends(3)
    fake.reject_template(99, "template archived")
    fake.queue("retry")
    first = fake.send(batch)
    assert [r.status for r in first] == ["retry", "sent", "sent"]
    again = fake.send(batch)
    assert [r.status for r in again] == ["sent"] * 3
    assert again[1].reference == first[1].reference and again[1].reason == "already sent"
    assert len(fake.applied) == 3 and len(fake.calls) == 2
    bad = sends(1, template=99)[0]
    assert fake.send([bad]) == [SendResult(bad.idempotency_key, "rejected", reason="template archived")]
    fake.queue(("rejected", "scripted no"))
    assert fake.send(sends(1, campaign=9))[0].reason == "scripted no"
    fake.close()
    assert fake.closed


# --- loader -----------------------------------------------------------------------------------

def test_load_builtins():
    adapter = load_send_adapter(Settings(send_url="http://platform.local/sends", send_mode="single",
                                         send_batch_size=50, send_concurrency=3, send_timeout=2.5,
                                         send_auth_header=Secret(AUTH)))
    assert isinstance(adapter, HttpSendAdapter)
    assert (adapter.url, adapter.mode, adapter.batch_size, adapter.concurrency, adapter.timeout) == \
        ("http://platform.local/sends", "single", 50, 3, 2.5)
    adapter.close()
    assert isinstance(load_send_adapter(Settings(send_adapter="log")), LogSendAdapter)
    assert isinstance(load_send_adapter(Settings(send_adapter=" fake ")), FakeSendAdapter)


def test_load_http_without_url_names_send_url():
    with pytest.raises(ValueError, match="SEND_URL"):
        load_send_adapter(Settings(send_adapter="http"))


def test_load_unknown_names_send_adapter_and_available():
    with pytest.raises(ValueError) as info:
        load_send_adapter(Settings(send_adapter="nope"))
    message = str(info.value)
    assert "'nope'" in message and "SEND_ADAPTER" in message
    assert "available: fake, http, log" in message


def test_load_from_entry_point(monkeypatch):
    monkeypatch.setattr(http, "entry_points", lambda group: [_EntryPoint("acme", FakeSendAdapter)]
                        if group == send.ENTRY_POINT_GROUP else [])
    assert isinstance(load_send_adapter(Settings(send_adapter="acme")), FakeSendAdapter)
    with pytest.raises(ValueError, match="acme"):
        load_send_adapter(Settings(send_adapter="other"))


def test_pyproject_registers_the_builtins():
    pyproject = tomllib.loads((Path(__file__).resolve().parents[2] / "pyproject.toml").read_text())
    group = pyproject["project"]["entry-points"][send.ENTRY_POINT_GROUP]
    assert send.ENTRY_POINT_GROUP == "relay.send_adapters"
    assert group == {"http": "shared.adapters.send:HttpSendAdapter", "log": "shared.adapters.send:LogSendAdapter",
                     "fake": "shared.adapters.send:FakeSendAdapter"}
