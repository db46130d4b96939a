"""Parsing GetCustomerSendDetailsByChannel rows: ScheduledTime in Optimove's time zone, attributes by name."""
from datetime import datetime, timedelta, timezone

import pytest

from shared.optimove.rows import attribute_values, parse_execution_row, parse_scheduled_time

UTC = timezone.utc


@pytest.mark.parametrize("text, zone, expected", [
    ("2026-11-28 10:00:00", "UTC", datetime(2026, 11, 28, 10, 0, tzinfo=UTC)),
    ("2026-11-28 10:00", "UTC", datetime(2026, 11, 28, 10, 0, tzinfo=UTC)),
    ("2026-11-28T10:00:30", "UTC", datetime(2026, 11, 28, 10, 0, 30, tzinfo=UTC)),
    ("2026-11-28 10:00:00", "America/New_York", datetime(2026, 11, 28, 15, 0, tzinfo=UTC)),
    ("2026-07-01 10:00", "Europe/London", datetime(2026, 7, 1, 9, 0, tzinfo=UTC)),  # summer time
    ("2026-11-28 10:00:00Z", "America/New_York", datetime(2026, 11, 28, 10, 0, tzinfo=UTC)),  # own offset wins
    ("2026-11-28 10:00:00+02:00", "UTC", datetime(2026, 11, 28, 8, 0, tzinfo=UTC)),
    ("2026/11/28 10:00", "UTC", datetime(2026, 11, 28, 10, 0, tzinfo=UTC)),
])
def test_scheduled_time_in_the_optimove_time_zone(text, zone, expected):
    assert parse_scheduled_time(text, zone) == expected


@pytest.mark.parametrize("value", [None, "", "  "])
def test_no_scheduled_time_means_due_now(value):
    assert parse_scheduled_time(value) is None


@pytest.mark.parametrize("value", ["tomorrow", "2026-13-40 10:00", "10:00"])
def test_a_scheduled_time_that_is_not_a_date_is_an_error(value):
    with pytest.raises(ValueError, match="not a date-time"):
        parse_scheduled_time(value)


def test_attributes_by_configured_name_in_both_forms():
    names = ("Email", "Country")
    listed = parse_execution_row({"CustomerID": "1", "TemplateID": 3, "CustomerAttributes": ["a@x.io", "US"]})
    joined = parse_execution_row({"customerId": "2", "templateId": "3", "CustomerAttribute": "b@x.io;GB"})
    commas = parse_execution_row({"CustomerID": "3", "TemplateID": 3, "CustomerAttribute": "c@x.io,DE"})
    assert attribute_values(listed.attributes, names) == {"Email": "a@x.io", "Country": "US"}
    assert attribute_values(joined.attributes, names) == {"Email": "b@x.io", "Country": "GB"}
    assert attribute_values(commas.attributes, names) == {"Email": "c@x.io", "Country": "DE"}
    assert joined.template_id == 3 and joined.customer_id == "2"


def test_missing_attribute_values_are_null_and_extra_ones_dropped():
    assert attribute_values(["a@x.io"], ("Email", "Country")) == {"Email": "a@x.io", "Country": None}
    assert attribute_values(["a", "b", "c"], ("Email",)) == {"Email": "a"}
    assert attribute_values(None, ("Email",)) == {"Email": None}
    assert attribute_values(["a"], ()) == {}
