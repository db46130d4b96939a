"""Fake Optimove, flow 1: GetCustomerSendDetailsByChannel, send-campaign specs, UpdateCampaignMetrics."""

from datetime import datetime, timezone
from zoneinfo import ZoneInfo

import pytest

from simulator import campaigns
from simulator.optimove import create_optimove_app

KEY = "test-key"
HEADERS = {"X-API-KEY": KEY}
SENDS = "/customers/GetCustomerSendDetailsByChannel"
METRICS = "/integrations/UpdateCampaignMetrics"
START = 1_795_917_600  # 2026-11-29 02:00:00 UTC


@pytest.fixture
def client():
    return create_optimove_app(KEY).test_client()


def add_campaign(client, **spec):
    spec = {"campaign_id": 88, "channels": [610, 611], "customers_per_channel": 25, "templates": [14, 15, 16],
            "schedule": {"start": START, "spread_seconds": 120, "due_now_fraction": 0.5}, **spec}
    response = client.post("/_sim/campaigns", json=spec)
    assert response.status_code == 200, response.json
    return response.json


def all_rows(client, query, top=10):
    rows, skip = [], 0
    while True:
        page = client.get(f"{SENDS}?{query}&$top={top}&$skip={skip}", headers=HEADERS)
        assert page.status_code == 200, page.json
        rows += page.json
        skip += len(page.json)
        if len(page.json) < top:
            return rows


def test_paging_rows_and_expected_sends(client):
    created = add_campaign(client)
    assert created["expected_sends"] == 50
    assert created["schedule"] == {"start": START, "spread_seconds": 120, "due_now_fraction": 0.5,
                                   "with_seconds": True}
    rows = all_rows(client, "ChannelID=611&CampaignID=88&CustomerAttributes=Email;Country")
    assert len(rows) == 25 and rows[0]["CustomerID"] == "C00000025" and rows[-1]["CustomerID"] == "C00000049"
    assert set(rows[0]) == {"CustomerID", "TemplateID", "ScheduledTime", "CustomerAttributes"}
    assert rows[0]["CustomerAttributes"] == ["c25@example.com", campaigns.attribute_value("Country", 25)]
    spec = campaigns.validate_spec({"campaign_id": 88, "channels": [610, 611], "customers_per_channel": 25,
                                    "templates": [14, 15, 16],
                                    "schedule": {"start": START, "spread_seconds": 120, "due_now_fraction": 0.5}})
    expected = campaigns.expected_sends(spec, ("Email", "Country"), channel_id=611)
    assert [(e.customer_id, e.template_id, e.due.strftime("%Y-%m-%d %H:%M:%S"), list(e.attributes.values()))
            for e in expected] == [(r["CustomerID"], r["TemplateID"], r["ScheduledTime"], r["CustomerAttributes"])
                                   for r in rows]
    assert {e.template_id for e in expected} == {14, 15, 16}
    assert all(e.template_id == [14, 15, 16][campaigns.customer_number(e.customer_id) % 3] for e in expected)
    assert len(campaigns.expected_sends(spec)) == 50 and campaigns.expected_sends(spec)[0].attributes == {}


def test_some_due_at_start_the_rest_spread_over_the_window():
    spec = campaigns.validate_spec({"campaign_id": 1, "channels": [610], "customers_per_channel": 1000,
                                    "schedule": {"start": START, "spread_seconds": 120, "due_now_fraction": 0.3}})
    dues = [send.due.timestamp() - START for send in campaigns.expected_sends(spec)]
    now = sum(1 for due in dues if due == 0)
    assert 290 <= now <= 310 and min(dues) == 0 and max(dues) <= 120
    assert len({due for due in dues if due > 0}) > 100  # spread, not bunched
    assert all(send.due.tzinfo is not None for send in campaigns.expected_sends(spec))


def test_without_attributes_and_the_string_and_mixed_forms(client):
    add_campaign(client, attribute_form="mixed")
    plain = client.get(f"{SENDS}?ChannelID=610&CampaignID=88", headers=HEADERS).json
    assert all(set(row) == {"CustomerID", "TemplateID", "ScheduledTime"} for row in plain)
    mixed = client.get(f"{SENDS}?ChannelID=610&CampaignID=88&CustomerAttributes=Email;Country;Tier",
                       headers=HEADERS).json
    even, odd = mixed[0], mixed[1]  # customers 0 and 1
    assert even["CustomerAttributes"] == ["c0@example.com", campaigns.attribute_value("Country", 0), "Tier-0"]
    assert "CustomerAttributes" not in odd
    assert odd["CustomerAttribute"] == f"c1@example.com;{campaigns.attribute_value('Country', 1)};Tier-1"
    add_campaign(client, campaign_id=89, attribute_form="string")
    comma = client.get(f"{SENDS}?ChannelID=610&CampaignID=89&CustomerAttributes=Email;Country"
                       f"&CustomerAttributesDelimiter=,", headers=HEADERS).json
    assert all("CustomerAttributes" not in row for row in comma)
    assert comma[2]["CustomerAttribute"] == f"c2@example.com,{campaigns.attribute_value('Country', 2)}"


def test_attribute_values_are_deterministic():
    assert campaigns.attribute_value("Email", 7) == "c7@example.com" == campaigns.attribute_value("email", 7)
    assert campaigns.attribute_value("Country", 7) in campaigns.COUNTRIES
    assert campaigns.attribute_value("Country", 7) == campaigns.attribute_value("Country", 7)
    assert campaigns.attribute_value("FirstName", 7) == "FirstName-7"
    assert campaigns.customer_number("C00000042") == 42


@pytest.mark.parametrize("zone", ["UTC", "Europe/Berlin", "America/New_York", "Asia/Kolkata"])
def test_scheduled_time_is_written_in_the_spec_time_zone(client, zone):
    add_campaign(client, timezone=zone, schedule={"start": START, "spread_seconds": 0, "due_now_fraction": 1})
    row = client.get(f"{SENDS}?ChannelID=610&CampaignID=88", headers=HEADERS).json[0]
    local = datetime.fromtimestamp(START, ZoneInfo(zone)).strftime("%Y-%m-%d %H:%M:%S")
    assert row["ScheduledTime"] == local
    spec = campaigns.validate_spec({"campaign_id": 88, "customers_per_channel": 1, "timezone": zone,
                                    "schedule": {"start": START}})
    due = campaigns.due_time(spec, 0)
    assert due.timestamp() == START and due.tzinfo == ZoneInfo(zone)


def test_without_seconds_times_are_truncated_to_the_minute(client):
    start = START + 37
    add_campaign(client, schedule={"start": start, "spread_seconds": 600, "due_now_fraction": 0.5,
                                   "with_seconds": False})
    rows = client.get(f"{SENDS}?ChannelID=610&CampaignID=88", headers=HEADERS).json
    assert all(len(row["ScheduledTime"]) == len("2026-11-29 02:00") for row in rows)
    times = [row["ScheduledTime"] for row in rows]
    assert times.count("2026-11-29 02:00") >= 10  # the ones due at once: start truncated to its minute
    spec = campaigns.validate_spec({"campaign_id": 88, "channels": [610, 611], "customers_per_channel": 25,
                                    "schedule": {"start": start, "spread_seconds": 600, "due_now_fraction": 0.5,
                                                 "with_seconds": False}})
    for row, send in zip(rows, campaigns.expected_sends(spec, channel_id=610)):
        assert send.due == datetime.strptime(row["ScheduledTime"], "%Y-%m-%d %H:%M").replace(tzinfo=timezone.utc)
        assert send.due.second == 0


def test_required_and_invalid_parameters(client):
    add_campaign(client)
    for query in ("CampaignID=88", "ChannelID=610", "", "ChannelID=x&CampaignID=88"):
        response = client.get(f"{SENDS}?{query}", headers=HEADERS)
        assert response.status_code == 400 and isinstance(response.json, str), query
    bad_names = client.get(f"{SENDS}?ChannelID=610&CampaignID=88&CustomerAttributes=Email;;Country", headers=HEADERS)
    assert bad_names.status_code == 400 and "CustomerAttributes" in bad_names.json
    for delimiter in ("ab", "a", "."):
        response = client.get(f"{SENDS}?ChannelID=610&CampaignID=88&CustomerAttributes=Email"
                              f"&CustomerAttributesDelimiter={delimiter}", headers=HEADERS)
        assert response.status_code == 400 and "Delimiter" in response.json, delimiter
    assert client.get(f"{SENDS}?ChannelID=999&CampaignID=88", headers=HEADERS).json == []
    assert client.get(f"{SENDS}?ChannelID=610&CampaignID=1", headers=HEADERS).json == []
    assert client.get(f"{SENDS}?ChannelID=610&CampaignID=88").status_code == 401
    assert client.post(f"{SENDS}?ChannelID=610&CampaignID=88", headers=HEADERS).status_code == 405


def test_page_size_cap_rate_limit_and_fault_injection(client):
    add_campaign(client, customers_per_channel=12_000, channels=[610])
    assert len(client.get(f"{SENDS}?ChannelID=610&CampaignID=88&$top=20000", headers=HEADERS).json) == 10_000
    client.post("/_sim/faults", json={"error_rate": 1.0})
    assert client.get(f"{SENDS}?ChannelID=610&CampaignID=88&$top=1", headers=HEADERS).status_code == 500
    client.post("/_sim/faults", json={})
    statuses = [client.get(f"{SENDS}?ChannelID=610&CampaignID=88&$top=1", headers=HEADERS).status_code
                for _ in range(60)]
    assert 429 in statuses
    assert client.get("/_sim/stats").json["requests_by_function"]["GetCustomerSendDetailsByChannel"] == 50


@pytest.mark.parametrize("change, field", [
    ({"templates": []}, "templates"),
    ({"templates": [14, 14]}, "templates"),
    ({"templates": ["14"]}, "templates"),
    ({"timezone": "Mars/Base"}, "timezone"),
    ({"timezone": 3}, "timezone"),
    ({"attribute_form": "csv"}, "attribute_form"),
    ({"schedule": {"start": -1}}, "schedule.start"),
    ({"schedule": {"spread_seconds": -1}}, "schedule.spread_seconds"),
    ({"schedule": {"due_now_fraction": 1.5}}, "schedule.due_now_fraction"),
    ({"schedule": {"with_seconds": "no"}}, "schedule.with_seconds"),
    ({"schedule": {"end": 5}}, "schedule"),
    ({"schedule": [1]}, "schedule"),
])
def test_invalid_send_fields_are_rejected(client, change, field):
    response = client.post("/_sim/campaigns", json={"campaign_id": 1, "customers_per_channel": 5, **change})
    assert response.status_code == 400 and field in response.json["error"]


def test_schedule_start_defaults_to_now():
    spec = campaigns.validate_spec({"campaign_id": 1, "customers_per_channel": 1}, now=START + 0.7)
    assert spec["schedule"] == {"start": START, "spread_seconds": 0, "due_now_fraction": 1.0, "with_seconds": True}
    assert spec["templates"] == [14] and spec["timezone"] == "UTC" and spec["attribute_form"] == "list"


def metric(**change):
    return {"ChannelID": 610, "CampaignID": 88, "TemplateID": 14, "MetricID": 0, "MetricValue": 12, **change}


def test_update_campaign_metrics_records_every_call(client):
    first = client.post(METRICS, json=[metric(), metric(TemplateID=15, MetricValue=3)], headers=HEADERS)
    assert first.status_code == 200 and first.data == b""
    client.post(METRICS, json=[metric(MetricValue=20), metric(CampaignID=99)], headers=HEADERS)
    everything = client.get("/_sim/campaign-metrics").json
    assert everything["calls"] == 2 and len(everything["metrics"]) == 4
    assert everything["metrics"][0] == {**metric(), "call": 1}
    mine = client.get("/_sim/campaign-metrics?campaign_id=88").json
    assert mine["calls"] == 2 and [m["call"] for m in mine["metrics"]] == [1, 1, 2]
    assert sorted((m["TemplateID"], m["MetricValue"]) for m in mine["latest"]) == [(14, 20), (15, 3)]
    assert client.get("/_sim/campaign-metrics?campaign_id=5").json == {"calls": 0, "metrics": [], "latest": []}
    assert client.get("/_sim/stats").json["requests_by_function"]["UpdateCampaignMetrics"] == 2
    client.post("/_sim/reset")
    assert client.get("/_sim/campaign-metrics").json["calls"] == 0


@pytest.mark.parametrize("body, words", [
    ([], "non-empty array"),
    ({"ChannelID": 610}, "non-empty array"),
    ([7], "Item 0"),
    ([metric(), metric(MetricValue="12")], "Item 1: MetricValue"),
    ([metric(TemplateID=None)], "TemplateID"),
    ([{k: v for k, v in metric().items() if k != "MetricID"}], "MetricID"),
    ([metric(ChannelID=True)], "ChannelID"),
    ([metric(MetricValue=1.5)], "MetricValue"),
])
def test_update_campaign_metrics_validation(client, body, words):
    response = client.post(METRICS, json=body, headers=HEADERS)
    assert response.status_code == 400 and isinstance(response.json, str) and words in response.json
    assert client.get("/_sim/campaign-metrics").json["calls"] == 0


def test_update_campaign_metrics_needs_json_content_type(client):
    response = client.post(METRICS, data=b"[]", headers={**HEADERS, "Content-Type": "text/plain"})
    assert response.status_code == 400 and "Content-Type" in response.json
