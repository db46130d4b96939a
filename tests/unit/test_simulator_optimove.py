"""Fake Optimove API: auth, rate limit, Content-Type strictness, paging, campaign specs."""

import itertools

import pytest

from simulator import campaigns
from simulator.limiter import max_in_window
from simulator.optimove import create_optimove_app

KEY = "test-key"
HEADERS = {"X-API-KEY": KEY}
LIST = "/customers/GetCustomerExecutionDetailsByCampaign"


class FakeClock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self):
        return self.now


@pytest.fixture
def clock():
    return FakeClock()


@pytest.fixture
def client(clock):
    return create_optimove_app(KEY, clock=clock).test_client()


def add_campaign(client, **spec):
    spec = {"campaign_id": 77, "channels": [504, 505, 506], "customers_per_channel": 25,
            "overlap": 0.5, "codes": ["WB23", "NV10"], "multi_code_every": 2, **spec}
    response = client.post("/_sim/campaigns", json=spec)
    assert response.status_code == 200, response.json
    return response.json


def test_api_key_required_and_header_name_case_insensitive(client):
    assert client.get("/general/GetRegisteredEventListeners").status_code == 401
    wrong = client.get("/general/GetRegisteredEventListeners", headers={"X-API-KEY": "nope"})
    assert wrong.status_code == 401 and wrong.json == "Unauthorized"
    right = client.get("/general/GetRegisteredEventListeners", headers={"x-api-key": KEY})
    assert right.status_code == 200 and right.json == []


def test_category_case_insensitive_and_unknown_function(client):
    assert client.get("/General/GetRegisteredEventListeners", headers=HEADERS).status_code == 200
    assert client.get("/general/NoSuchThing", headers=HEADERS).status_code == 404
    assert client.get("/general/RegisterEventListener", headers=HEADERS).status_code == 405


def test_rate_limit_window_and_exact_stats(client, clock):
    statuses = []
    for _ in range(60):
        statuses.append(client.get("/general/GetRegisteredEventListeners", headers=HEADERS).status_code)
        clock.now += 0.01
    assert statuses.count(200) == 50 and statuses[50:] == [429] * 10
    throttled = client.get("/general/GetRegisteredEventListeners", headers=HEADERS)
    assert throttled.json["error"] == "Too Many Requests" and throttled.json["status"] == 429
    clock.now = 1000.0 + 10.0
    assert client.get("/general/GetRegisteredEventListeners", headers=HEADERS).status_code == 200
    stats = client.get("/_sim/stats").json
    assert stats["accepted"] == 51 and stats["throttled"] == 11
    assert stats["max_in_window"] == 50 and stats["limit"] == 50 and stats["window_seconds"] == 10
    assert stats["requests_by_function"] == {"GetRegisteredEventListeners": 51}


def test_max_in_window_two_pointer():
    assert max_in_window([], 10) == 0
    assert max_in_window([0, 1, 9.9, 10, 10.5, 19.95], 10) == 4
    assert max_in_window([0, 10, 20], 10) == 1


def test_burst_429_fault_and_error_rate(client):
    assert client.post("/_sim/faults", json={"burst_429": {"every": 3, "length": 2}}).status_code == 200
    codes = [client.get("/general/GetRegisteredEventListeners", headers=HEADERS).status_code for _ in range(10)]
    assert codes == [200, 200, 200, 429, 429, 200, 200, 200, 429, 429]
    add_campaign(client)
    client.post("/_sim/faults", json={"error_rate": 1.0})
    assert client.get(f"{LIST}?CampaignID=77&ChannelID=504", headers=HEADERS).status_code == 500
    client.post("/_sim/faults", json={})
    assert client.get(f"{LIST}?CampaignID=77&ChannelID=504", headers=HEADERS).status_code == 200
    assert client.post("/_sim/faults", json={"error_rate": 3}).status_code == 400


def test_post_requires_exact_content_type(client):
    body = b'[{"PromoCode": "WB23", "PromotionName": "Welcome back"}]'
    for content_type in ("application/json; charset=utf-8", "text/plain", None):
        headers = dict(HEADERS, **({"Content-Type": content_type} if content_type else {}))
        response = client.post("/integrations/AddPromotions", data=body, headers=headers)
        assert response.status_code == 400 and isinstance(response.json, str)
    ok = client.post("/integrations/AddPromotions", data=body,
                     headers=dict(HEADERS, **{"Content-Type": "application/json"}))
    assert ok.status_code == 200 and ok.data == b""
    assert client.get("/integrations/GetPromotions", headers=HEADERS).json == [
        {"PromoCode": "WB23", "PromotionName": "Welcome back"}]


def test_add_promotions_limit_and_malformed(client):
    many = [{"PromoCode": f"P{i}", "PromotionName": "x"} for i in range(101)]
    assert client.post("/integrations/AddPromotions", json=many, headers=HEADERS).status_code == 400
    assert client.post("/integrations/AddPromotions", json=[{"Code": 1}], headers=HEADERS).status_code == 400


def test_listeners_and_promotion_status(client):
    body = {"EventTypeID": 13, "ListenerURL": "http://relay/listener?token=t", "ChannelID": 504}
    assert client.post("/general/RegisterEventListener", json=body, headers=HEADERS).status_code == 200
    assert client.get("/general/GetRegisteredEventListeners", headers=HEADERS).json == [body]
    update = {"TimeStamp": "2026-11-27 10:00:00", "CampaignID": 9,
              "PromosUpdated": [{"CustomerID": "C1", "Status": True}, {"CustomerID": "C2", "Status": False}]}
    assert client.post("/integrations/UpdateCustomerPromotionStatus", json=update, headers=HEADERS).status_code == 200
    stored = client.get("/_sim/promotion-status/9").json
    assert stored["statuses"] == {"C1": True, "C2": False} and len(stored["calls"]) == 1 and stored["true"] == 1
    too_many = dict(update, PromosUpdated=[{"CustomerID": f"C{i}", "Status": True} for i in range(10_001)])
    assert client.post("/integrations/UpdateCustomerPromotionStatus", json=too_many, headers=HEADERS).status_code == 400


def test_campaign_details(client):
    add_campaign(client)
    details = client.get("/actions/GetCampaignDetails?CampaignID=77", headers=HEADERS).json
    assert details["CampaignID"] == 77 and details["Status"] == "Successful"
    assert [c["Id"] for c in details["Channels"]] == [504, 505, 506]


def test_paging_until_short_page(client):
    created = add_campaign(client, customers_per_channel=25)
    assert created["customers_per_channel"] == {"504": 25, "505": 25, "506": 25}
    pages, skip = [], 0
    while True:
        page = client.get(f"{LIST}?CampaignID=77&ChannelID=505&$top=10&$skip={skip}", headers=HEADERS).json
        pages.append(page)
        skip += len(page)
        if len(page) < 10:
            break
    assert [len(p) for p in pages] == [10, 10, 5]
    rows = list(itertools.chain(*pages))
    assert rows[0]["CustomerID"] == "C00000012" and rows[-1]["CustomerID"] == "C00000036"
    assert all(row["ChannelID"] == 505 and row["ScheduleTime"] for row in rows)
    assert isinstance(rows[6]["PromoCode"], list) and isinstance(rows[5]["PromoCode"], str)


def test_customer_list_parameters(client):
    add_campaign(client, customers_per_channel=12_000)
    assert len(client.get(f"{LIST}?CampaignID=77&ChannelID=504", headers=HEADERS).json) == 10_000
    assert len(client.get(f"{LIST}?CampaignID=77&ChannelID=504&$top=20000", headers=HEADERS).json) == 10_000
    assert client.get(f"{LIST}?CampaignID=78&ChannelID=504", headers=HEADERS).json == []
    assert client.get(f"{LIST}?CampaignID=77&ChannelID=999", headers=HEADERS).json == []
    assert client.get(f"{LIST}?ChannelID=504", headers=HEADERS).status_code == 400
    assert client.get(f"{LIST}?CampaignID=abc", headers=HEADERS).status_code == 400


def test_invalid_spec_is_rejected_with_message(client):
    response = client.post("/_sim/campaigns", json={"campaign_id": 1, "customers_per_channel": 5, "overlap": 1})
    assert response.status_code == 400 and "overlap" in response.json["error"]


def test_reset_clears_campaigns_and_stats(client):
    add_campaign(client)
    client.get("/general/GetRegisteredEventListeners", headers=HEADERS)
    client.post("/_sim/reset")
    stats = client.get("/_sim/stats").json
    assert stats["accepted"] == 0 and stats["campaigns"] == []


def brute_force(spec):
    triples = set()
    for channel in spec["channels"]:
        for row in campaigns.channel_rows(spec, channel, 0, 10**9):
            codes = row["PromoCode"] if isinstance(row["PromoCode"], list) else row["PromoCode"].split(",")
            triples.update((spec["campaign_id"], row["CustomerID"], code) for code in codes)
    return triples


@pytest.mark.parametrize("overlap", [0, 0.5, 0.9])
@pytest.mark.parametrize("every", [0, 2, 3])
@pytest.mark.parametrize("n", [1, 7, 40])
def test_expected_triples_matches_brute_force(overlap, every, n):
    spec = campaigns.validate_spec({"campaign_id": 5, "channels": [504, 505, 506], "customers_per_channel": n,
                                    "overlap": overlap, "codes": ["WB23", "NV10", "X1"], "multi_code_every": every})
    triples = brute_force(spec)
    assert campaigns.expected_triples(spec) == len(triples)
    assert campaigns.unique_customers(spec) == len({customer for _, customer, _ in triples})


def test_large_campaign_pages_are_cheap():
    spec = campaigns.validate_spec({"campaign_id": 5, "customers_per_channel": 300_000, "overlap": 0.3,
                                    "codes": ["WB23", "NV10"], "multi_code_every": 2})
    last_page = campaigns.channel_rows(spec, 506, 290_000, 10_000)
    assert len(last_page) == 10_000 and campaigns.channel_rows(spec, 506, 300_000, 10_000) == []
    assert campaigns.expected_triples(spec) > 600_000
