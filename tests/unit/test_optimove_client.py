"""OptimoveClient against a real local HTTP server; row parsing; backoff."""
from __future__ import annotations

import email.utils
import json
import random
import socket
import time

import pytest

from shared.optimove.client import (OptimoveClient, OptimoveError, PermanentError, RateLimited,
                                    TemporaryError, backoff, parse_retry_after)
from shared.optimove.rows import ExecutionRow, parse_execution_row
from shared.settings import Secret
from tests.stub_server import StubServer

API_KEY = "sk-test-0123456789-VERYSECRET"


class Server(StubServer):
    """The fake Optimove base URL: `reply(request)` returns (status, headers, body bytes)."""

    def __init__(self):
        super().__init__("/current/")
        self.reply = lambda req: (200, {}, b"[]")


@pytest.fixture
def server():
    srv = Server()
    yield srv
    srv.close()


@pytest.fixture
def client(server):
    c = OptimoveClient(server.url, Secret(API_KEY), timeout=2.0)
    yield c
    c.close()


def _json(status, data, headers=None):
    return lambda req: (status, {"Content-Type": "application/json", **(headers or {})}, json.dumps(data).encode())


def test_get_sends_key_accept_and_builds_url(server, client):
    server.reply = _json(200, [{"CampaignID": 12}])
    assert client.get("Actions", "GetExecutedCampaignsByChannel", {"ChannelID": 504}) == [{"CampaignID": 12}]
    req = server.requests[0]
    assert req["method"] == "GET"
    assert req["path"] == "/current/actions/GetExecutedCampaignsByChannel"
    assert req["query"] == {"ChannelID": ["504"]}
    assert req["headers"]["x-api-key"] == API_KEY
    assert req["headers"]["accept"] == "application/json"
    assert "content-type" not in req["headers"]


def test_post_sends_exact_json_content_type_and_empty_200_is_none(server, client):
    server.reply = lambda req: (200, {}, b"")
    body = {"TimeStamp": "2018-10-27 09:33:00", "CampaignID": 1359,
            "PromosUpdated": [{"CustomerID": "C1", "Status": True}]}
    assert client.post("integrations", "UpdateCustomerPromotionStatus", body) is None
    req = server.requests[0]
    assert req["method"] == "POST"
    assert req["path"] == "/current/integrations/UpdateCustomerPromotionStatus"
    assert req["headers"]["content-type"] == "application/json"
    assert json.loads(req["body"]) == body


def test_post_query_params(server, client):
    server.reply = lambda req: (200, {}, b"")
    client.post("integrations", "AddChannelTemplates", [{"TemplateID": 1, "TemplateName": "x"}], {"ChannelID": 7})
    assert server.requests[0]["query"] == {"ChannelID": ["7"]}


def test_fetch_page_adds_top_and_skip(server, client):
    server.reply = _json(200, [{"CustomerID": "1"}])
    page = client.fetch_page("customers", "GetCustomerExecutionDetailsByCampaign",
                             {"CampaignID": 5, "ChannelID": 9}, skip=20, top=10)
    assert page == [{"CustomerID": "1"}]
    assert server.requests[0]["query"] == {"CampaignID": ["5"], "ChannelID": ["9"], "$top": ["10"], "$skip": ["20"]}


def test_fetch_page_rejects_non_array(server, client):
    server.reply = _json(200, {"not": "a list"})
    with pytest.raises(PermanentError):
        client.fetch_page("customers", "F", {}, 0, 10)


def _pager(total):
    def reply(req):
        top, skip = int(req["query"]["$top"][0]), int(req["query"]["$skip"][0])
        rows = [{"CustomerID": str(i)} for i in range(skip, min(total, skip + top))]
        return 200, {"Content-Type": "application/json"}, json.dumps(rows).encode()
    return reply


@pytest.mark.parametrize("total,calls", [(25, 3), (30, 4), (0, 1)])
def test_iter_pages_until_short_or_empty_page(server, client, total, calls):
    server.reply = _pager(total)
    pages = list(client.iter_pages("customers", "GetCustomerSendDetailsByCampaign", {"CampaignID": 1}, 10))
    ids = [row["CustomerID"] for page in pages for row in page]
    assert ids == [str(i) for i in range(total)]
    assert all(pages)
    assert len(server.requests) == calls
    assert [r["query"]["$skip"][0] for r in server.requests] == [str(10 * i) for i in range(calls)]


@pytest.mark.parametrize("status,body", [
    (400, b'"Bad Request"'), (401, b'"Unauthorized"'), (403, b"Authorization-Token Expired"),
    (404, b"not found"), (405, b'"Method Not Allowed"'), (422, b"{}"), (418, b"teapot"),
])
def test_client_errors_are_permanent_with_status_and_text(server, client, status, body):
    server.reply = lambda req: (status, {}, body)
    with pytest.raises(PermanentError) as info:
        client.get("customers", "F", {})
    assert info.value.status == status
    assert str(status) in info.value.reason
    assert body.decode().strip('"') in info.value.reason
    assert not isinstance(info.value, TemporaryError)


def test_error_text_is_trimmed(server, client):
    server.reply = lambda req: (400, {}, b"x" * 5000)
    with pytest.raises(PermanentError) as info:
        client.get("customers", "F", {})
    assert len(info.value.reason) < 400


@pytest.mark.parametrize("status", [429, 500, 502, 503, 504])
def test_429_and_5xx_are_temporary(server, client, status):
    server.reply = _json(status, {"status": status, "error": "Too Many Requests"})
    with pytest.raises(TemporaryError) as info:
        client.get("customers", "F", {})
    assert str(status) in info.value.reason
    assert info.value.retry_after is None


def test_retry_after_seconds(server, client):
    server.reply = _json(429, {"status": 429}, {"Retry-After": "7"})
    with pytest.raises(TemporaryError) as info:
        client.get("customers", "F", {})
    assert info.value.retry_after == 7.0


def test_retry_after_http_date(server, client):
    when = email.utils.formatdate(time.time() + 30, usegmt=True)
    server.reply = _json(503, "busy", {"Retry-After": when})
    with pytest.raises(TemporaryError) as info:
        client.get("customers", "F", {})
    assert 25 <= info.value.retry_after <= 31


def test_parse_retry_after_garbage_and_past():
    assert parse_retry_after(None) is None
    assert parse_retry_after("soon") is None
    assert parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT") == 0.0
    assert parse_retry_after("1.5") == 1.5


def test_200_with_non_json_body_is_temporary(server, client):
    server.reply = lambda req: (200, {"Content-Type": "text/html"}, b"<html>maintenance</html>")
    with pytest.raises(TemporaryError) as info:
        client.get("customers", "F", {})
    assert "not JSON" in info.value.reason


def test_timeout_is_temporary(server):
    def slow(req):
        time.sleep(1.0)
        return 200, {}, b"[]"
    server.reply = slow
    c = OptimoveClient(server.url, Secret(API_KEY), timeout=0.2)
    with pytest.raises(TemporaryError) as info:
        c.get("customers", "F", {})
    assert "timed out" in info.value.reason


def test_connection_error_is_temporary():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    c = OptimoveClient(f"http://127.0.0.1:{port}", Secret(API_KEY), timeout=1.0)
    with pytest.raises(TemporaryError) as info:
        c.get("customers", "F", {})
    assert "ConnectionError" in info.value.reason


def test_api_key_never_in_errors_or_repr(server, client):
    echo = lambda status: (lambda req: (status, {}, f"bad key {req['headers']['x-api-key']}".encode()))
    for status in (401, 500, 200):
        server.reply = echo(status)
        with pytest.raises(OptimoveError) as info:
            client.get("customers", "F", {})
        assert API_KEY not in str(info.value) and API_KEY not in repr(info.value)
        assert "***" in info.value.reason
    assert API_KEY not in repr(client)


class _Limiter:
    def __init__(self, waits):
        self.waits = list(waits)

    def try_acquire(self):
        return self.waits.pop(0)


def test_limiter_without_slot_raises_rate_limited_without_calling(server):
    c = OptimoveClient(server.url, Secret(API_KEY), limiter=_Limiter([0.0, 2.5]))
    server.reply = _json(200, [])
    assert c.get("customers", "F", {}) == []
    with pytest.raises(RateLimited) as info:
        c.get("customers", "F", {})
    assert isinstance(info.value, TemporaryError)
    assert info.value.wait_seconds == 2.5 and info.value.retry_after == 2.5
    assert len(server.requests) == 1


def test_backoff_bounds():
    rng = random.Random(1)
    for attempt in range(12):
        for _ in range(50):
            delay = backoff(attempt, base=1.0, cap=60.0, rng=rng)
            assert 0 <= delay <= min(60.0, 2 ** attempt)
    assert backoff(1000, rng=rng) <= 60.0
    assert backoff(0, retry_after=5.0, rng=rng) >= 5.0
    assert backoff(3, cap=60.0, retry_after=120.0, rng=rng) == 120.0
    assert backoff(3, retry_after=10_000.0, rng=rng) == 300.0


class _Top:
    """An rng that always picks the top of the range."""

    @staticmethod
    def uniform(lo, hi):
        return hi


def test_backoff_grows_exponentially_to_cap():
    assert [backoff(a, base=0.5, cap=10.0, rng=_Top) for a in range(7)] == [0.5, 1, 2, 4, 8, 10, 10]


# --- rows -----------------------------------------------------------------------------------

def test_parse_row_documented_shape():
    row = {"CustomerID": "231342", "ActionID": 19, "ChannelID": 504, "TemplateID": "14",
           "TemplateName": "x", "ScheduleTime": "2015-12-30 10:30:00", "PromoCode": "A7Bonus, B2 ,,A7Bonus",
           "CustomerAttributes": ["jdavis@aol.com", "US"]}
    assert parse_execution_row(row) == ExecutionRow(
        customer_id="231342", promo_codes=["A7Bonus", "B2"], channel_id=504, template_id=14, action_id=19,
        schedule_time="2015-12-30 10:30:00", attributes=["jdavis@aol.com", "US"])


def test_parse_row_other_casing_and_variants():
    row = {"customerId": 8871, "scheduledTime": "2022-07-19 08:54", "promoCode": [" X ", "", "Y", "X"],
           "actionId": "4", "CustomerAttribute": "Yo999;UA"}
    parsed = parse_execution_row(row)
    assert parsed.customer_id == "8871"
    assert parsed.schedule_time == "2022-07-19 08:54"
    assert parsed.promo_codes == ["X", "Y"]
    assert parsed.action_id == 4
    assert parsed.channel_id is None and parsed.template_id is None
    assert parsed.attributes == ["Yo999", "UA"]
    assert parse_execution_row({"CUSTOMERID": "a", "CustomerAttribute": "p,q"}, delimiter=",").attributes == ["p", "q"]


def test_parse_row_missing_optional_fields():
    assert parse_execution_row({"CustomerID": "C1"}) == ExecutionRow("C1", [], None, None, None, None, None)
    assert parse_execution_row({"CustomerID": "C1", "ChannelID": "abc", "PromoCode": None}).channel_id is None


@pytest.mark.parametrize("row", [{}, {"CustomerID": ""}, {"CustomerID": "  "}, {"CustomerID": None},
                                 {"PromoCode": "X"}, {"CustomerID": True}, "not a dict"])
def test_parse_row_without_customer_is_none(row):
    assert parse_execution_row(row) is None


@pytest.mark.parametrize("row", [
    {"CustomerID": "C1", "PromoCode": "WB23"},
    {"CustomerID": "C1", "PromoCode": "WB23, NV10,WB23"},
    {"CustomerID": "C1", "PromoCode": ["WB23", " NV10 ", None, ""]},
    {"customerId": "C1", "promoCode": " WB23 "},
    {"CustomerID": "C1"},
    {"CustomerID": "C1", "PromoCode": ""},
    {"CustomerID": 42, "PromoCode": "A"},
    {"CustomerID": " C1 ", "PromoCode": "A"},
    {"customer_id": "C1", "promo_code": "A"},
    {"CustomerID": "", "PromoCode": "A"},
    {"CustomerID": None, "PromoCode": "A"},
    {"PromoCode": "A"},
    ["not", "a", "row"],
])
def test_customer_codes_fast_path_agrees_with_full_parse(row):
    from shared.optimove.rows import customer_codes, parse_execution_row

    parsed = parse_execution_row(row)
    assert customer_codes(row) == ((parsed.customer_id, parsed.promo_codes) if parsed else None)


def test_backoff_floor_spans_a_known_time():
    class _Bottom:
        @staticmethod
        def uniform(lo, hi):
            return lo

    waits = [backoff(a, cap=30, floor=0.5, rng=_Bottom) for a in range(1, 8)]
    assert waits == [1, 2, 4, 8, 15, 15, 15] and sum(waits) == 60
