"""Fake Optimove for flow 4 and cancellations: conditional specs, GetProcessedCampaignCustomers,
GetCanceledCampaignCustomers (2-hour availability), GetCustomersActionEndedByDate, the
UpdateCustomerPromotionStatus record and the rate-limit record."""

import pytest

from simulator import campaigns
from simulator.campaigns import SpecError
from simulator.optimove import CANCELED_AVAILABLE_SECONDS, create_optimove_app

KEY = "test-key"
HEADERS = {"X-API-KEY": KEY}
PROCESSED = "/customers/GetProcessedCampaignCustomers"
CANCELED = "/customers/GetCanceledCampaignCustomers"
ENDED = "/customers/GetCustomersActionEndedByDate"
UPDATE = "/integrations/UpdateCustomerPromotionStatus"


class FakeClock:
    def __init__(self, now):
        self.now = now

    def __call__(self):
        return self.now


@pytest.fixture
def clocks():
    return FakeClock(1000.0), FakeClock(1_800_000_000.0)


@pytest.fixture
def client(clocks):
    clock, wall = clocks
    return create_optimove_app(KEY, clock=clock, wall_clock=wall).test_client()


def conditional(client, **spec):
    spec = {"campaign_id": 55, "conditional": True, "channels": [], "customers_per_channel": 25,
            "codes": ["WB23", "NV10"], "multi_code_every": 2, **spec}
    response = client.post("/_sim/campaigns", json=spec)
    assert response.status_code == 200, response.json
    return response.json


def pages(client, path, top, **params):
    rows, skip = [], 0
    while True:
        query = "&".join(f"{k}={v}" for k, v in {**params, "$top": top, "$skip": skip}.items())
        page = client.get(f"{path}?{query}", headers=HEADERS)
        assert page.status_code == 200, page.json
        rows += page.json
        skip += len(page.json)
        if len(page.json) < top:
            return rows


def codes_of(row):
    return row["PromoCode"] if isinstance(row["PromoCode"], list) else row["PromoCode"].split(",")


# --- specs ---------------------------------------------------------------------------------------


def test_conditional_spec_without_channels_and_its_validation():
    spec = campaigns.validate_spec({"campaign_id": 1, "conditional": True, "channels": [], "customers_per_channel": 9})
    assert campaigns.unique_customers(spec) == 9 and campaigns.audience_numbers(spec) == list(range(9))
    assert spec["action_id"] == 1 and spec["extra_code"] is None and spec["action_end_date"] is None
    for bad, field in [({"channels": []}, "channels"), ({"conditional": "yes"}, "conditional"),
                       ({"conditional": True, "extra_code": "WB23"}, "extra_code"),
                       ({"conditional": True, "extra_code": "A,B"}, "extra_code"),
                       ({"conditional": True, "extra_code_every": 3}, "extra_code_every"),
                       ({"action_end_date": "2026-2-30"}, "action_end_date"),
                       ({"action_end_date": "2026-02-30"}, "action_end_date"),
                       ({"action_id": 0}, "action_id"), ({"duration": -1}, "duration"),
                       ({"target_group_id": True}, "target_group_id")]:
        with pytest.raises(SpecError, match=field):
            campaigns.validate_spec({"campaign_id": 1, "customers_per_channel": 3, **bad})


def test_audience_of_a_conditional_campaign_with_channels_is_their_union():
    spec = campaigns.validate_spec({"campaign_id": 1, "conditional": True, "channels": [504, 505],
                                    "customers_per_channel": 10, "overlap": 0.5})
    assert campaigns.audience_numbers(spec) == list(range(15))
    assert campaigns.audience_numbers(spec, 8, 4) == [8, 9, 10, 11]
    assert campaigns.audience_numbers(spec, 14, 10) == [14] and campaigns.audience_numbers(spec, 15, 10) == []
    gapped = campaigns.validate_spec({"campaign_id": 1, "channels": [504, 505], "customers_per_channel": 3,
                                      "overlap": 0})
    assert campaigns.audience_numbers(gapped, 2, 3) == [2, 3, 4]


@pytest.mark.parametrize("every", [0, 2, 3])
@pytest.mark.parametrize("extra_every", [1, 4, 5])
@pytest.mark.parametrize("overlap", [0, 0.5])
def test_expected_triples_count_the_extra_code(every, extra_every, overlap):
    spec = campaigns.validate_spec({"campaign_id": 5, "channels": [504, 505, 506], "customers_per_channel": 17,
                                    "overlap": overlap, "codes": ["WB23", "NV10"], "multi_code_every": every,
                                    "extra_code": "XX", "extra_code_every": extra_every})
    triples = {(row["CustomerID"], code) for channel in spec["channels"]
               for row in campaigns.channel_rows(spec, channel, 0, 100) for code in codes_of(row)}
    assert campaigns.expected_triples(spec) == len(triples)
    assert sum(code == "XX" for _, code in triples) == sum(
        campaigns.holds_extra_code(spec, n) for n in campaigns.audience_numbers(spec))


def test_cancelled_fraction_is_spread_evenly_and_deterministic():
    spec = campaigns.validate_spec({"campaign_id": 1, "conditional": True, "channels": [],
                                    "customers_per_channel": 1000})
    half = campaigns.cancelled_numbers(spec, 0.5)
    assert 490 <= len(half) <= 510 and half == campaigns.cancelled_numbers(spec, 0.5)
    assert 40 <= sum(n < 100 for n in half) <= 60
    assert campaigns.cancelled_numbers(spec, 1.0) == range(1000) and campaigns.cancelled_numbers(spec, 0) == []
    assert campaigns.cancelled_numbers(spec, customer_ids=["C00000007", "C00000003"]) == [3, 7]
    with pytest.raises(SpecError, match="not in campaign"):
        campaigns.cancelled_numbers(spec, customer_ids=["C00001000"])
    with pytest.raises(SpecError, match="not in campaign"):
        campaigns.cancelled_numbers(spec, customer_ids=["7"])


# --- GetProcessedCampaignCustomers -------------------------------------------------------------


def test_processed_customers_paged_with_both_promo_code_forms(client):
    conditional(client, multi_code_every=3, extra_code="BAD", extra_code_every=5, action_id=42)
    rows = pages(client, PROCESSED, 10, CampaignID=55)
    assert [row["CustomerID"] for row in rows] == [campaigns.customer_id(n) for n in range(25)]
    assert {tuple(sorted(row)) for row in rows} == {("ActionID", "CustomerID", "PromoCode")}
    assert all(row["ActionID"] == 42 for row in rows)
    assert isinstance(rows[6]["PromoCode"], list) and isinstance(rows[5]["PromoCode"], str)
    assert codes_of(rows[0]) == ["WB23", "NV10"] and codes_of(rows[1]) == ["WB23"]
    assert codes_of(rows[4]) == ["WB23", "BAD"] and codes_of(rows[9]) == ["WB23", "NV10", "BAD"]
    assert len(client.get(f"{PROCESSED}?CampaignID=55", headers=HEADERS).json) == 25


def test_processed_customers_errors_and_unknown_campaigns(client):
    conditional(client)
    client.post("/_sim/campaigns", json={"campaign_id": 56, "customers_per_channel": 5})
    missing = client.get(PROCESSED, headers=HEADERS)
    assert missing.status_code == 400 and isinstance(missing.json, str)
    assert client.get(f"{PROCESSED}?CampaignID=x", headers=HEADERS).status_code == 400
    assert client.get(f"{PROCESSED}?CampaignID=55&$top=-1", headers=HEADERS).status_code == 400
    assert client.get(f"{PROCESSED}?CampaignID=56", headers=HEADERS).json == []  # not conditional
    assert client.get(f"{PROCESSED}?CampaignID=99", headers=HEADERS).json == []
    assert client.get(f"{PROCESSED}?CampaignID=55", headers={"X-API-KEY": "no"}).status_code == 401
    assert client.post(f"{PROCESSED}?CampaignID=55", headers=HEADERS).status_code == 405


def test_processed_customers_are_rate_limited_and_fault_injected(client, clocks):
    conditional(client)
    client.post("/_sim/faults", json={"error_rate": 1.0})
    assert client.get(f"{PROCESSED}?CampaignID=55", headers=HEADERS).status_code == 500
    client.post("/_sim/faults", json={"burst_429": {"every": 1, "length": 1}})
    codes = [client.get(f"{PROCESSED}?CampaignID=55", headers=HEADERS).status_code for _ in range(4)]
    assert codes == [200, 429, 200, 429]
    client.post("/_sim/faults", json={})
    codes = [client.get(f"{PROCESSED}?CampaignID=55", headers=HEADERS).status_code for _ in range(50)]
    assert codes.count(429) == 50 - (50 - 3)  # 3 accepted earlier: the window holds 50
    stats = client.get("/_sim/stats").json
    assert stats["max_in_window"] == 50 and stats["throttled"] == 5
    assert stats["requests"] == 55 and stats["max_requests_in_window"] == 55


def test_large_processed_campaign_pages_are_cheap(client):
    conditional(client, customers_per_channel=120_000)
    page = client.get(f"{PROCESSED}?CampaignID=55&$top=20000&$skip=110000", headers=HEADERS).json
    assert len(page) == 10_000 and page[-1]["CustomerID"] == campaigns.customer_id(119_999)


# --- GetCanceledCampaignCustomers ----------------------------------------------------------------


def test_cancel_all_then_list_disappears_after_two_hours(client, clocks):
    clock, wall = clocks
    conditional(client)
    assert client.get(f"{CANCELED}?CampaignID=55", headers=HEADERS).json == []
    marked = client.post("/_sim/campaigns/55/cancel", json={}).json
    assert marked == {"campaign_id": 55, "cancelled": 25, "cancelled_at": wall.now,
                      "available_until": wall.now + 7200}
    rows = pages(client, CANCELED, 10, CampaignID=55)
    assert [row["CustomerID"] for row in rows] == [campaigns.customer_id(n) for n in range(25)]
    assert {tuple(sorted(row)) for row in rows} == {("ActionID", "CustomerID", "PromoCode")}
    assert rows[0]["ActionID"] == "1" and codes_of(rows[0]) == ["WB23", "NV10"]
    assert isinstance(rows[6]["PromoCode"], list) and isinstance(rows[7]["PromoCode"], str)
    clock.now += CANCELED_AVAILABLE_SECONDS - 1
    assert len(client.get(f"{CANCELED}?CampaignID=55", headers=HEADERS).json) == 25
    clock.now += 1
    assert client.get(f"{CANCELED}?CampaignID=55", headers=HEADERS).json == []
    assert client.get("/_sim/cancellations").json == {
        "55": {"cancelled": 25, "cancelled_at": wall.now, "available": False}}
    assert client.get(CANCELED, headers=HEADERS).status_code == 400


def test_cancel_a_fraction_or_a_list(client):
    conditional(client, customers_per_channel=100)
    half = client.post("/_sim/campaigns/55/cancel", json={"fraction": 0.5}).json["cancelled"]
    rows = client.get(f"{CANCELED}?CampaignID=55", headers=HEADERS).json
    spec = campaigns.validate_spec({"campaign_id": 55, "conditional": True, "channels": [],
                                    "customers_per_channel": 100})
    assert len(rows) == half and [row["CustomerID"] for row in rows] == [
        campaigns.customer_id(n) for n in campaigns.cancelled_numbers(spec, 0.5)]
    listed = client.post("/_sim/campaigns/55/cancel", json={"customer_ids": ["C00000009", "C00000002"]}).json
    assert listed["cancelled"] == 2
    assert [row["CustomerID"] for row in client.get(f"{CANCELED}?CampaignID=55", headers=HEADERS).json] == [
        "C00000002", "C00000009"]


@pytest.mark.parametrize("body, status", [
    ({"fraction": 1.5}, 400), ({"fraction": True}, 400), ({"customer_ids": "C1"}, 400),
    ({"customer_ids": ["C00000999"]}, 400), ({"fraction": 0.5, "customer_ids": []}, 400), ({"x": 1}, 400),
    ([], 400)])
def test_cancel_validation(client, body, status):
    conditional(client)
    assert client.post("/_sim/campaigns/55/cancel", json=body).status_code == status
    assert client.post("/_sim/campaigns/99/cancel", json={}).status_code == 404


# --- GetCustomersActionEndedByDate -----------------------------------------------------------------


def test_actions_ended_from_admin_rows_and_specs(client):
    client.post("/_sim/campaigns", json={"campaign_id": 60, "channels": [504, 505], "customers_per_channel": 3,
                                         "overlap": 0, "action_end_date": "2026-12-01", "action_id": 9,
                                         "duration": 14, "target_group_id": 4})
    conditional(client, customers_per_channel=2, action_end_date="2026-12-01")
    added = client.post("/_sim/actions-ended", json={"date": "2026-12-01", "rows": [
        {"CustomerID": "X1", "ActionID": 3, "ChannelID": 504}]})
    assert added.json == {"date": "2026-12-01", "rows": 1}
    rows = pages(client, ENDED, 3, Date="2026-12-01")
    assert rows[0] == {"CustomerID": "X1", "ActionID": 3, "ChannelID": 504, "Date": "2026-12-01", "Duration": 7,
                       "TargetGroupID": 1}
    assert [(r["CustomerID"], r["ChannelID"]) for r in rows[1:]] == [
        ("C00000000", 0), ("C00000001", 0),  # campaign 55 (no channels) comes first
        ("C00000000", 504), ("C00000001", 504), ("C00000002", 504),
        ("C00000003", 505), ("C00000004", 505), ("C00000005", 505)]
    assert rows[-1] == {"CustomerID": "C00000005", "ActionID": 9, "ChannelID": 505, "Date": "2026-12-01",
                        "Duration": 14, "TargetGroupID": 4}
    assert client.get(f"{ENDED}?Date=2026-12-02", headers=HEADERS).json == []
    client.post("/_sim/actions-ended", json={"date": "2026-12-01", "rows": [], "replace": True})
    assert len(client.get(f"{ENDED}?Date=2026-12-01", headers=HEADERS).json) == 8


@pytest.mark.parametrize("date", ["", "2026-13-01", "2026-1-01", "01.12.2026", "2026-12-01T00:00"])
def test_actions_ended_bad_date(client, date):
    response = client.get(f"{ENDED}?Date={date}", headers=HEADERS)
    assert response.status_code == 400 and isinstance(response.json, str)
    assert client.get(ENDED, headers=HEADERS).status_code == 400


@pytest.mark.parametrize("body", [
    {"date": "2026-12-1", "rows": []}, {"date": "2026-12-01"}, {"date": "2026-12-01", "rows": [{"ActionID": 1}]},
    {"date": "2026-12-01", "rows": [{"CustomerID": "C", "ActionID": "1"}]},
    {"date": "2026-12-01", "rows": [{"CustomerID": "C"}]},
    {"date": "2026-12-01", "rows": [{"CustomerID": "C", "ActionID": 1, "Date": "2026-12-02"}]},
    {"date": "2026-12-01", "rows": [{"CustomerID": "C", "ActionID": 1, "Other": 1}]}])
def test_actions_ended_admin_validation(client, body):
    assert client.post("/_sim/actions-ended", json=body).status_code == 400


# --- UpdateCustomerPromotionStatus record ----------------------------------------------------------


def update(client, campaign_id, statuses, stamp="2026-11-27 10:00:00"):
    body = {"TimeStamp": stamp, "CampaignID": campaign_id,
            "PromosUpdated": [{"CustomerID": c, "Status": s} for c, s in statuses.items()]}
    return client.post(UPDATE, json=body, headers=HEADERS)


def test_promotion_status_records_calls_and_first_true(client, clocks):
    _, wall = clocks
    start = wall.now
    assert update(client, 7, {"C1": True, "C2": False, "C3": False}).status_code == 200
    wall.now += 5
    assert update(client, 7, {"C2": True, "C1": False}).status_code == 200
    wall.now += 5
    assert update(client, 7, {"C2": True}).status_code == 200
    view = client.get("/_sim/promotion-status?campaign_id=7").json
    assert view["calls"] == [
        {"at": start, "size": 3, "true": 1, "false": 2, "timestamp": "2026-11-27 10:00:00"},
        {"at": start + 5, "size": 2, "true": 1, "false": 1, "timestamp": "2026-11-27 10:00:00"},
        {"at": start + 10, "size": 1, "true": 1, "false": 0, "timestamp": "2026-11-27 10:00:00"}]
    assert view["statuses"] == {"C1": False, "C2": True, "C3": False}
    assert view["first_true_at"] == {"C1": start, "C2": start + 5}
    assert view["max_call_size"] == 3 and view["reported"] == 3 and view["true"] == 1 and view["false"] == 2
    assert view["true_then_false"] == 1 and "deadline" not in view
    timed = client.get(f"/_sim/promotion-status?campaign_id=7&deadline={start + 4}&customers=0").json
    assert timed["true_before_deadline"] == 1 and timed["true_after_deadline"] == 1
    assert timed["calls_after_deadline"] == 2 and "statuses" not in timed and "first_true_at" not in timed
    assert client.get("/_sim/promotion-status/7").json == view
    assert client.get("/_sim/promotion-status").status_code == 400
    empty = client.get("/_sim/promotion-status?campaign_id=8").json
    assert empty["calls"] == [] and empty["statuses"] == {} and empty["max_call_size"] == 0


def test_promotion_status_validation_keeps_the_10000_limit(client):
    assert update(client, 7, {f"C{i}": True for i in range(10_000)}).status_code == 200
    too_many = update(client, 7, {f"D{i}": True for i in range(10_001)})
    assert too_many.status_code == 400 and "10000" in too_many.json
    bad = client.post(UPDATE, json={"TimeStamp": "x", "CampaignID": 7, "PromosUpdated": [{"CustomerID": 1}]},
                      headers=HEADERS)
    assert bad.status_code == 400
    view = client.get("/_sim/promotion-status?campaign_id=7&customers=0").json
    assert view["max_call_size"] == 10_000 and len(view["calls"]) == 1


def test_stats_since_covers_only_later_requests(client, clocks):
    clock, _ = clocks
    for _ in range(5):
        client.get("/general/GetRegisteredEventListeners", headers=HEADERS)
    mark = client.get("/_sim/stats").json["clock_now"]
    clock.now += 20
    for _ in range(3):
        client.get("/general/GetRegisteredEventListeners", headers=HEADERS)
    since = client.get(f"/_sim/stats?since={mark}").json
    assert since["accepted"] == 3 and since["requests"] == 3 and since["max_requests_in_window"] == 3
    whole = client.get("/_sim/stats").json
    assert whole["accepted"] == 8 and whole["max_in_window"] == 5


def test_reset_forgets_cancellations_ended_rows_and_statuses(client):
    conditional(client)
    client.post("/_sim/campaigns/55/cancel", json={})
    client.post("/_sim/actions-ended", json={"date": "2026-12-01", "rows": [{"CustomerID": "X", "ActionID": 1}]})
    update(client, 55, {"C1": True})
    client.post("/_sim/reset")
    assert client.get("/_sim/cancellations").json == {}
    assert client.get(f"{ENDED}?Date=2026-12-01", headers=HEADERS).json == []
    assert client.get("/_sim/promotion-status?campaign_id=55").json["calls"] == []
