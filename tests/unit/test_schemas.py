"""Payload parsing for every event type: casing, string ids, missing fields, bad types."""
from __future__ import annotations

from datetime import datetime

import pytest
from marshmallow import ValidationError

from shared.optimove.rows import parse_promo_codes
from shared.schemas import parse_notification


def camel(body: dict) -> dict:
    return {k[0].lower() + k[1:].replace("ID", "Id"): v for k, v in body.items()}


CASES = {
    1: {"EventTypeID": 1, "TimeStamp": "2026-11-27 09:00:00", "CampaignID": 7},
    2: {"EventTypeID": 2, "TimeStamp": "2026-11-27 23:00:00"},
    3: {"EventTypeID": 3, "TimeStamp": "2026-11-27 23:30"},
    4: {"EventTypeID": 4, "CampaignID": 7},
    5: {"EventTypeID": 5, "CampaignID": 7, "ClearanceRequiredBy": "2026-11-27 09:30"},
    11: {"EventTypeID": 11, "CampaignID": 7, "CustomerID": "C1", "ChannelID": 505, "TemplateID": 3,
         "PromoCode": "A, B"},
    13: {"EventTypeID": 13, "CampaignID": 7, "ChannelID": 504, "TimeStamp": "2022-09-19 05:04:54"},
}


@pytest.mark.parametrize("event_type", sorted(CASES))
@pytest.mark.parametrize("casing", [dict, camel], ids=["PascalCase", "camelCase"])
def test_every_event_type_in_both_casings(event_type, casing):
    n = parse_notification(casing(CASES[event_type]))
    assert n.event_type == event_type
    if "CampaignID" in CASES[event_type]:
        assert n.campaign_id == 7


@pytest.mark.parametrize("event_type", sorted(CASES))
def test_string_ids_accepted(event_type):
    body = {k: (str(v) if k.endswith("ID") else v) for k, v in CASES[event_type].items()}
    assert parse_notification(body) == parse_notification(CASES[event_type])


def test_dedupe_keys():
    assert parse_notification(CASES[13]).dedupe_key == "13:7:504"
    assert parse_notification(CASES[5]).dedupe_key == "5:7"
    assert parse_notification(CASES[4]).dedupe_key == "4:7"
    assert parse_notification(CASES[1]).dedupe_key == "1:7"
    assert parse_notification(CASES[2]).dedupe_key == "2:2026-11-27T23:00:00"
    a = parse_notification(CASES[11]).dedupe_key
    assert a == parse_notification(camel(CASES[11])).dedupe_key
    assert a != parse_notification({**CASES[11], "CustomerID": "C2"}).dedupe_key


def test_timestamps_lenient():
    assert parse_notification(CASES[3]).timestamp == datetime(2026, 11, 27, 23, 30)
    for text in ("2026-11-27 09:30", "2026-11-27 09:30:00", "2026-11-27T09:30:00", "2026-11-27 9:30"):
        assert parse_notification({**CASES[5], "ClearanceRequiredBy": text}).clearance_required_by == \
            datetime(2026, 11, 27, 9, 30)


def test_unknown_keys_ignored_by_schema():
    n = parse_notification({**CASES[13], "Brand": "x", "event_device_type": "ios"})
    assert n.channel_id == 504


def test_promo_codes_list_or_string():
    assert parse_notification(CASES[11]).promo_codes == ["A", "B"]
    assert parse_notification({**CASES[11], "PromoCode": ["A", "B", "A", ""]}).promo_codes == ["A", "B"]
    assert parse_promo_codes(None) == [] and parse_promo_codes(" , ") == []


def test_event_type_from_hint():
    assert parse_notification({"CampaignID": 1, "ChannelID": 2}, "13").event_type == 13
    assert parse_notification({**CASES[1]}, "13").event_type == 1


@pytest.mark.parametrize("body,field", [
    ({"CampaignID": 7}, "EventTypeID"),
    ({"EventTypeID": 42, "CampaignID": 7}, "EventTypeID"),
    ({"EventTypeID": 13, "CampaignID": 7}, "ChannelID"),
    ({"EventTypeID": 5, "CampaignID": 7}, "ClearanceRequiredBy"),
    ({"EventTypeID": 11, "CampaignID": 7}, "CustomerID"),
    ({"EventTypeID": 2}, "TimeStamp"),
    ({"EventTypeID": 13, "CampaignID": "7a", "ChannelID": 1}, "CampaignID"),
    ({"EventTypeID": 13, "CampaignID": 7.5, "ChannelID": 1}, "CampaignID"),
    ({"EventTypeID": 13, "CampaignID": True, "ChannelID": 1}, "CampaignID"),
    ({"EventTypeID": 13, "CampaignID": [7], "ChannelID": 1}, "CampaignID"),
    ({"EventTypeID": 13, "CampaignID": 2 ** 63, "ChannelID": 1}, "CampaignID"),
    ({"EventTypeID": 13, "CampaignID": "-1", "ChannelID": 1}, "CampaignID"),
    ({"EventTypeID": 1, "CampaignID": 7, "TimeStamp": "yesterday"}, "TimeStamp"),
    ({"EventTypeID": 11, "CampaignID": 7, "CustomerID": {"id": 1}}, "CustomerID"),
    ({"EventTypeID": 11, "CampaignID": 7, "CustomerID": "C", "PromoCode": 5}, "PromoCode"),
    ({"EventTypeID": 13, "CampaignID": 7, "campaignId": 8, "ChannelID": 1}, "CampaignID"),
])
def test_bad_input_names_the_field(body, field):
    with pytest.raises(ValidationError) as err:
        parse_notification(body)
    assert field in err.value.normalized_messages()


def test_not_an_object():
    for body in ([], "x", 3, None):
        with pytest.raises(ValidationError):
            parse_notification(body)
