"""Payload parsing for every event type: casing, string ids, missing fields, bad types."""
from __future__ import annotations

from datetime import datetime

import pytest
from marshmallow import ValidationError

from shared.optimove.rows import parse_promo_codes
from shared.schemas import parse_notification, parse_trigger


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


# -- EventTypeID 11: every accepted shape gives the same trigger -----------------------------

TRIGGER_SHAPES = {
    "pascal": {"EventTypeID": 11, "TimeStamp": "2026-11-28 10:00:00", "CampaignID": 9001, "ChannelID": 600,
               "CustomerID": "c-1", "TemplateID": 14, "PromoCode": ["A1", "B2"], "event_device_type": "ios"},
    "camel_ID": {"eventTypeID": 11, "timeStamp": "2026-11-28 10:00", "campaignID": "9001", "channelID": "600",
                 "customerID": "c-1", "templateID": 14, "promoCode": "A1,B2", "event_device_type": "ios"},
    "camel_Id": {"eventTypeId": "11", "campaignId": 9001, "channelId": 600, "customerId": "c-1",
                 "templateId": "14", "promoCode": " A1 , B2 ", "event_device_type": "ios"},
    "promo_codes_key": {"EventTypeID": 11, "CampaignID": 9001, "ChannelID": 600, "CustomerID": "c-1",
                        "TemplateID": 14, "PromoCodes": ["A1", "B2", "A1"], "event_device_type": "ios"},
}


@pytest.mark.parametrize("shape", sorted(TRIGGER_SHAPES))
def test_every_trigger_shape_gives_the_same_trigger(shape):
    body = TRIGGER_SHAPES[shape]
    trigger = parse_trigger(body)
    assert (trigger.campaign_id, trigger.channel_id, trigger.customer_id, trigger.template_id,
            trigger.promo_codes) == (9001, 600, "c-1", 14, ["A1", "B2"])
    assert trigger.attributes == {"event_device_type": "ios"}
    assert parse_notification(body).event_type == 11


def test_trigger_keeps_every_other_field_as_sent_and_numeric_customer_ids():
    body = {"EventTypeID": 11, "CampaignID": 1, "CustomerID": 42, "TemplateID": 3, "Email": "a@example.com",
            "cart": {"items": 2}, "event_name": "deposit"}
    trigger = parse_trigger(body)
    assert trigger.customer_id == "42" and trigger.promo_codes == [] and trigger.channel_id is None
    assert trigger.attributes == {"Email": "a@example.com", "cart": {"items": 2}, "event_name": "deposit"}


@pytest.mark.parametrize("body, field", [
    ({"EventTypeID": 11, "CampaignID": 1, "ChannelID": 600, "PromoCode": "A"}, "CustomerID"),
    ({"EventTypeID": 11, "CampaignID": 1, "customerId": "  "}, "CustomerID"),
    ({"EventTypeID": 11, "CustomerID": "c"}, "CampaignID"),
    ({"EventTypeID": 11, "CampaignID": 1, "CustomerID": "c", "TemplateID": "x"}, "TemplateID"),
    ({"EventTypeID": 11, "CampaignID": 1, "CustomerID": "c", "customerId": "d"}, "CustomerID"),
])
def test_trigger_rejections_name_the_field(body, field):
    with pytest.raises(ValidationError) as err:
        parse_notification(body)
    assert field in err.value.normalized_messages()
