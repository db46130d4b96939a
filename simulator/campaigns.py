"""Campaign specs for the fake Optimove: validation and deterministic row generation.

A spec describes a multi-channel campaign without listing its customers. Channel index k
holds customer numbers ``start_k .. start_k + n - 1`` with
``start_k = round(k * n * (1 - overlap))``; rows are computed on demand, page by page.

The send fields (``templates``, ``schedule``, ``timezone``, ``attribute_form``) shape the rows
of GetCustomerSendDetailsByChannel (flow 1). Customer number n gets template
``templates[n % len(templates)]``. Its ScheduledTime is ``schedule.start`` for a fraction
``due_now_fraction`` of the customers and spread over ``(start, start + spread_seconds]`` for
the others (``u(n) = frac((n + 1) * 0.618...)`` picks which, evenly over any range of
numbers); it is written in ``timezone`` and truncated to the second, or to the minute without
``schedule.with_seconds``. ``expected_sends`` lists what a relay must send; ``attribute_value``
gives one attribute's value.

Conditional execution (flow 4) and cancellation use the *audience*: the distinct customers of
all channels, in order of customer number. A spec with ``conditional: true`` is on hold for
clearance and its audience is what GetProcessedCampaignCustomers lists (``processed_rows``);
such a spec may have no channels (``channels: []``), and then its audience is customer numbers
``0 .. customers_per_channel - 1``. Every 7th row of the audience lists ``PromoCode`` as a JSON
list, the others as a comma-separated string. ``extra_code`` is one more code held by every
``extra_code_every``-th customer (numbers n with ``(n + 1) % extra_code_every == 0``), e.g. a
code the fake bonus system is told to reject. ``cancelled_numbers`` picks a cancelled subset
(``canceled_rows`` lists it). ``action_id``, ``duration`` and ``target_group_id`` fill the rows'
ActionID, Duration and TargetGroupID; with ``action_end_date`` (YYYY-MM-DD) every customer of
every channel is listed by GetCustomersActionEndedByDate for that date (``action_ended_rows``;
ChannelID 0 for a campaign without channels).
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass
from datetime import date, datetime
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

MAX_CUSTOMER_NUMBER = 10**8
SCHEDULE_TIME = "2026-11-27 10:00:00"
LIST_PROMO_EVERY = 7
DEFAULTS = {
    "channels": [504, 505, 506],
    "overlap": 0.0,
    "codes": ["WB23"],
    "multi_code_every": 0,
}
SEND_DEFAULTS = {
    "templates": [14],
    "timezone": "UTC",
    "attribute_form": "list",
}
SCHEDULE_DEFAULTS = {"spread_seconds": 0, "due_now_fraction": 1.0, "with_seconds": True}
CONDITIONAL_DEFAULTS = {
    "conditional": False,
    "action_id": 1,
    "extra_code": None,
    "extra_code_every": 0,
    "action_end_date": None,
    "duration": 7,
    "target_group_id": 1,
}
DATE = re.compile(r"\d{4}-\d{2}-\d{2}")
ATTRIBUTE_FORMS = ("list", "string", "mixed")
COUNTRIES = ("US", "GB", "DE", "FR", "IL", "BR")
GOLDEN_FRACTION = 0.6180339887498949


class SpecError(ValueError):
    """A campaign spec is malformed; the message says which field and why."""


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def validate_spec(raw: Any, now: float | None = None) -> dict:
    """Return a normalised copy of a campaign spec, or raise SpecError naming the bad field.

    A send campaign's ``schedule.start`` defaults to ``now`` (default: the current time).
    """
    if not isinstance(raw, dict):
        raise SpecError("spec must be a JSON object")
    unknown = set(raw) - {"campaign_id", "customers_per_channel", "schedule", *DEFAULTS, *SEND_DEFAULTS,
                          *CONDITIONAL_DEFAULTS}
    if unknown:
        raise SpecError(f"unknown fields: {sorted(unknown)}")
    spec = {**DEFAULTS, **SEND_DEFAULTS, **CONDITIONAL_DEFAULTS, **raw}
    if not isinstance(spec["conditional"], bool):
        raise SpecError("conditional must be true or false")
    if "campaign_id" not in raw or not _is_int(spec["campaign_id"]) or spec["campaign_id"] <= 0:
        raise SpecError("campaign_id must be a positive integer")
    if not _is_int(spec.get("customers_per_channel")) or spec["customers_per_channel"] < 0:
        raise SpecError("customers_per_channel must be a non-negative integer")
    channels = spec["channels"]
    if (not isinstance(channels, list) or not (channels or spec["conditional"])
            or not all(_is_int(c) and c > 0 for c in channels) or len(set(channels)) != len(channels)):
        raise SpecError("channels must be a non-empty list of distinct positive integers "
                        "(or empty for a conditional campaign)")
    overlap = spec["overlap"]
    if isinstance(overlap, bool) or not isinstance(overlap, (int, float)) or not 0 <= overlap < 1:
        raise SpecError("overlap must be a number in [0, 1)")
    codes = spec["codes"]
    if (not isinstance(codes, list) or not codes
            or not all(isinstance(c, str) and c.strip() and "," not in c for c in codes)
            or len(set(codes)) != len(codes)):
        raise SpecError("codes must be a non-empty list of distinct non-empty strings without commas")
    if not _is_int(spec["multi_code_every"]) or spec["multi_code_every"] < 0:
        raise SpecError("multi_code_every must be a non-negative integer")
    spec["overlap"] = float(overlap)
    spec["channels"] = list(channels)
    spec["codes"] = list(codes)
    if _channel_start(spec, max(0, len(channels) - 1)) + spec["customers_per_channel"] > MAX_CUSTOMER_NUMBER:
        raise SpecError("campaign too large: customer numbers must stay below 10**8")
    _validate_send_fields(spec, now)
    _validate_conditional_fields(spec)
    return spec


def parse_date(text: Any) -> date | None:
    """The date of a strict ``YYYY-MM-DD`` string, or None when ``text`` is anything else."""
    if not isinstance(text, str) or not DATE.fullmatch(text):
        return None
    try:
        return datetime.strptime(text, "%Y-%m-%d").date()
    except ValueError:
        return None


def _validate_conditional_fields(spec: dict) -> None:
    """Check ``action_id``, ``extra_code``, ``extra_code_every``, ``action_end_date``, ``duration`` and
    ``target_group_id`` in place."""
    for name in ("action_id", "target_group_id"):
        if not _is_int(spec[name]) or spec[name] <= 0:
            raise SpecError(f"{name} must be a positive integer")
    if not _is_int(spec["duration"]) or spec["duration"] < 0:
        raise SpecError("duration must be a non-negative integer (days)")
    extra, every = spec["extra_code"], spec["extra_code_every"]
    if extra is not None and (not isinstance(extra, str) or not extra.strip() or "," in extra
                              or extra in spec["codes"]):
        raise SpecError("extra_code must be null or a non-empty string without commas, not one of codes")
    if not _is_int(every) or every < 0:
        raise SpecError("extra_code_every must be a non-negative integer")
    if every and extra is None:
        raise SpecError("extra_code_every needs an extra_code")
    if spec["action_end_date"] is not None and parse_date(spec["action_end_date"]) is None:
        raise SpecError("action_end_date must be null or a date YYYY-MM-DD")


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _validate_send_fields(spec: dict, now: float | None) -> None:
    """Check and normalise ``templates``, ``schedule``, ``timezone`` and ``attribute_form`` in place."""
    templates = spec["templates"]
    if (not isinstance(templates, list) or not templates
            or not all(_is_int(t) and t > 0 for t in templates) or len(set(templates)) != len(templates)):
        raise SpecError("templates must be a non-empty list of distinct positive integers")
    spec["templates"] = list(templates)
    raw = spec.get("schedule", {})
    if not isinstance(raw, dict) or set(raw) - {"start", *SCHEDULE_DEFAULTS}:
        raise SpecError("schedule must be an object with start, spread_seconds, due_now_fraction "
                        "and/or with_seconds")
    schedule = {**SCHEDULE_DEFAULTS, **raw}
    schedule.setdefault("start", int(time.time() if now is None else now))
    if not _number(schedule["start"]) or schedule["start"] <= 0:
        raise SpecError("schedule.start must be a positive number (epoch seconds)")
    if not _number(schedule["spread_seconds"]) or schedule["spread_seconds"] < 0:
        raise SpecError("schedule.spread_seconds must be a non-negative number")
    if not _number(schedule["due_now_fraction"]) or not 0 <= schedule["due_now_fraction"] <= 1:
        raise SpecError("schedule.due_now_fraction must be a number in [0, 1]")
    if not isinstance(schedule["with_seconds"], bool):
        raise SpecError("schedule.with_seconds must be true or false")
    schedule["due_now_fraction"] = float(schedule["due_now_fraction"])
    spec["schedule"] = schedule
    try:
        if not isinstance(spec["timezone"], str) or not spec["timezone"]:
            raise ValueError
        ZoneInfo(spec["timezone"])
    except (ValueError, ZoneInfoNotFoundError):
        raise SpecError(f"timezone must be an IANA time zone name such as Europe/Berlin, "
                        f"got {spec['timezone']!r}") from None
    if spec["attribute_form"] not in ATTRIBUTE_FORMS:
        raise SpecError(f"attribute_form must be one of {', '.join(ATTRIBUTE_FORMS)}")


def _channel_start(spec: dict, index: int) -> int:
    return round(index * spec["customers_per_channel"] * (1 - spec["overlap"]))


def _merged_ranges(spec: dict) -> list[tuple[int, int]]:
    n = spec["customers_per_channel"]
    if not spec["channels"]:  # a conditional campaign without channels: one audience
        return [(0, n)] if n else []
    merged: list[tuple[int, int]] = []
    for index in range(len(spec["channels"])):
        start = _channel_start(spec, index)
        if n == 0:
            continue
        if merged and start <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(merged[-1][1], start + n))
        else:
            merged.append((start, start + n))
    return merged


def unique_customers(spec: dict) -> int:
    """Number of distinct customers over all channels of the campaign."""
    return sum(end - start for start, end in _merged_ranges(spec))


def expected_triples(spec: dict) -> int:
    """Number of unique (campaign, customer, promo code) triples over all channels.

    Computed from the union of the channels' customer ranges, without materialising them.
    """
    every = spec["multi_code_every"]
    extra_codes = len(spec["codes"]) - 1
    extra_every = spec.get("extra_code_every", 0)
    total = 0
    for start, end in _merged_ranges(spec):
        total += end - start
        if every > 0 and extra_codes:
            total += extra_codes * ((end - 1) // every - (start - 1) // every)
        if extra_every > 0:
            total += end // extra_every - start // extra_every
    return total


def customers_per_channel(spec: dict) -> dict[int, int]:
    """Map each channel id to its number of customers."""
    return {channel: spec["customers_per_channel"] for channel in spec["channels"]}


def promo_codes_for(spec: dict, number: int) -> list[str]:
    """The promo codes a customer number holds in this campaign."""
    every = spec["multi_code_every"]
    codes = list(spec["codes"]) if every > 0 and number % every == 0 else [spec["codes"][0]]
    if holds_extra_code(spec, number):
        codes.append(spec["extra_code"])
    return codes


def holds_extra_code(spec: dict, number: int) -> bool:
    """Whether customer number ``number`` also holds the spec's ``extra_code``."""
    every = spec.get("extra_code_every", 0)
    return every > 0 and (number + 1) % every == 0


def customer_id(number: int) -> str:
    """Optimove-style string customer id for a customer number."""
    return f"C{number:08d}"


def channel_rows(spec: dict, channel_id: int, skip: int, top: int) -> list[dict]:
    """One page of GetCustomerExecutionDetailsByCampaign rows for a channel ([] if unknown).

    Every 7th row of a channel carries ``PromoCode`` as a JSON list instead of a
    comma-separated string, because Optimove's format is ambiguous.
    """
    if channel_id not in spec["channels"] or top <= 0:
        return []
    index = spec["channels"].index(channel_id)
    start = _channel_start(spec, index)
    n = spec["customers_per_channel"]
    first, last = min(skip, n), min(skip + top, n)
    template_id = 12 + index
    rows = []
    for position in range(first, last):
        number = start + position
        codes = promo_codes_for(spec, number)
        rows.append({
            "CustomerID": customer_id(number),
            "ActionID": spec.get("action_id", 1),
            "ChannelID": channel_id,
            "TemplateID": template_id,
            "TemplateName": f"Bonus template {template_id}",
            "ScheduleTime": SCHEDULE_TIME,
            "PromoCode": codes if position % LIST_PROMO_EVERY == LIST_PROMO_EVERY - 1 else ",".join(codes),
        })
    return rows


def campaign_rows(spec: dict, skip: int, top: int) -> list[dict]:
    """One page over all channels in order, for calls that omit ChannelID."""
    n = spec["customers_per_channel"]
    rows: list[dict] = []
    for index, channel in enumerate(spec["channels"]):
        base = index * n
        if skip + top <= base or len(rows) >= top:
            break
        local_skip = max(0, skip - base)
        rows.extend(channel_rows(spec, channel, local_skip, top - len(rows)))
    return rows


# --- send rows (GetCustomerSendDetailsByChannel, flow 1) ---------------------------------------


@dataclass(frozen=True)
class ExpectedSend:
    """One send a relay must make for a send campaign: customer, template, due time, attributes."""

    channel_id: int
    customer_id: str
    template_id: int
    due: datetime
    attributes: dict[str, str]

    @property
    def key(self) -> tuple[int, str]:
        """(channel, customer): a customer gets one send per channel."""
        return (self.channel_id, self.customer_id)


def customer_number(customer: str) -> int:
    """The customer number of a ``customer_id`` (``"C00000012"`` -> 12)."""
    return int(customer.lstrip("Cc"))


def attribute_value(name: str, number: int) -> str:
    """The value of attribute ``name`` for customer number ``number``.

    ``Email`` -> ``c{n}@example.com``, ``Country`` -> one of a few ISO codes (case-insensitive
    names), any other name -> ``{name}-{n}``.
    """
    lowered = name.lower()
    if lowered == "email":
        return f"c{number}@example.com"
    if lowered == "country":
        return COUNTRIES[number % len(COUNTRIES)]
    return f"{name}-{number}"


def template_for(spec: dict, number: int) -> int:
    """The template customer number ``number`` gets in a send campaign."""
    templates = spec["templates"]
    return templates[number % len(templates)]


def _time_format(spec: dict) -> str:
    return "%Y-%m-%d %H:%M:%S" if spec["schedule"]["with_seconds"] else "%Y-%m-%d %H:%M"


def _due_offset(schedule: dict, number: int) -> float:
    """Seconds after ``start``: 0 for the due-now fraction, else evenly over the spread."""
    fraction = schedule["due_now_fraction"]
    u = ((number + 1) * GOLDEN_FRACTION) % 1.0  # never 0: with fraction 0, nobody is due at once
    if u < fraction or fraction >= 1:
        return 0.0
    return schedule["spread_seconds"] * (u - fraction) / (1 - fraction)


def scheduled_time(spec: dict, number: int) -> str:
    """The ScheduledTime string of customer number ``number``, in the spec's time zone."""
    schedule = spec["schedule"]
    when = datetime.fromtimestamp(schedule["start"] + _due_offset(schedule, number), ZoneInfo(spec["timezone"]))
    return when.strftime(_time_format(spec))


def due_time(spec: dict, number: int) -> datetime:
    """The instant customer number ``number``'s ScheduledTime denotes, as an aware datetime.

    The string is read in the spec's time zone (an ambiguous wall time at a DST change is the
    first of the two).
    """
    return datetime.strptime(scheduled_time(spec, number), _time_format(spec)).replace(
        tzinfo=ZoneInfo(spec["timezone"]))


def _string_form(spec: dict, number: int) -> bool:
    form = spec["attribute_form"]
    return form == "string" or (form == "mixed" and number % 2 == 1)


def send_rows(spec: dict, channel_id: int, skip: int, top: int, attribute_names=(),
              delimiter: str = ";") -> list[dict]:
    """One page of GetCustomerSendDetailsByChannel rows for a channel ([] if unknown).

    ``attribute_names`` are the requested CustomerAttributes; their values come as the list
    ``CustomerAttributes`` or, in the string form, as ``CustomerAttribute`` joined by
    ``delimiter``. Without names the rows carry neither key.
    """
    if channel_id not in spec["channels"] or top <= 0:
        return []
    start = _channel_start(spec, spec["channels"].index(channel_id))
    n = spec["customers_per_channel"]
    rows = []
    for position in range(min(skip, n), min(skip + top, n)):
        number = start + position
        row = {"CustomerID": customer_id(number), "TemplateID": template_for(spec, number),
               "ScheduledTime": scheduled_time(spec, number)}
        if attribute_names:
            values = [attribute_value(name, number) for name in attribute_names]
            if _string_form(spec, number):
                row["CustomerAttribute"] = delimiter.join(values)
            else:
                row["CustomerAttributes"] = values
        rows.append(row)
    return rows


def expected_sends_count(spec: dict) -> int:
    """Number of sends of a send campaign: one per customer per channel."""
    return spec["customers_per_channel"] * len(spec["channels"])


def expected_sends(spec: dict, attribute_names=(), channel_id: int | None = None) -> list[ExpectedSend]:
    """Every send a relay must make for the campaign (one channel's with ``channel_id``).

    ``attribute_names`` are the attributes the relay asks for (its channel config); each send's
    ``attributes`` maps them to their values.
    """
    channels = spec["channels"] if channel_id is None else [channel_id]
    sends = []
    for channel in channels:
        if channel not in spec["channels"]:
            continue
        start = _channel_start(spec, spec["channels"].index(channel))
        for number in range(start, start + spec["customers_per_channel"]):
            sends.append(ExpectedSend(channel, customer_id(number), template_for(spec, number),
                                      due_time(spec, number),
                                      {name: attribute_value(name, number) for name in attribute_names}))
    return sends


# --- audience (conditional execution, cancellation, ended actions) -------------------------------


def audience_numbers(spec: dict, skip: int = 0, top: int | None = None) -> list[int]:
    """Customer numbers at audience positions ``skip .. skip + top - 1`` (the distinct customers
    of all channels in order; without channels, ``0 .. customers_per_channel - 1``)."""
    numbers: list[int] = []
    wanted = unique_customers(spec) if top is None else top
    for start, end in _merged_ranges(spec):
        if len(numbers) >= wanted:
            break
        size = end - start
        if skip >= size:
            skip -= size
            continue
        first = start + skip
        numbers.extend(range(first, min(end, first + wanted - len(numbers))))
        skip = 0
    return numbers


def in_audience(spec: dict, number: int) -> bool:
    """Whether customer number ``number`` belongs to the campaign."""
    return any(start <= number < end for start, end in _merged_ranges(spec))


def _promo_field(codes: list[str], position: int) -> list[str] | str:
    """Every 7th position lists the codes as a JSON list, the others as one comma-separated string."""
    return codes if position % LIST_PROMO_EVERY == LIST_PROMO_EVERY - 1 else ",".join(codes)


def processed_rows(spec: dict, skip: int, top: int) -> list[dict]:
    """One page of GetProcessedCampaignCustomers rows: ``{"CustomerID", "PromoCode", "ActionID"}`` per
    audience customer; [] unless the spec is ``conditional``."""
    if not spec.get("conditional") or top <= 0:
        return []
    return [{"CustomerID": customer_id(number),
             "PromoCode": _promo_field(promo_codes_for(spec, number), skip + offset),
             "ActionID": spec["action_id"]}
            for offset, number in enumerate(audience_numbers(spec, skip, top))]


def fraction_selected(number: int, fraction: float) -> bool:
    """Whether customer number ``number`` is among an evenly spread ``fraction`` of any range of numbers."""
    return fraction >= 1 or ((number + 1) * GOLDEN_FRACTION) % 1.0 < fraction


def cancelled_numbers(spec: dict, fraction: float = 1.0, customer_ids=None) -> list[int] | range:
    """The customer numbers a cancellation covers: the listed ``customer_ids`` (which must belong to
    the campaign, else SpecError), else an evenly spread ``fraction`` of the audience (all by default).
    Sorted; a range when the whole audience is cancelled."""
    if customer_ids is not None:
        numbers = set()
        for customer in customer_ids:
            try:
                number = customer_number(customer)
            except (TypeError, ValueError, AttributeError):
                number = -1
            if customer != customer_id(number) or not in_audience(spec, number):
                raise SpecError(f"customer {customer!r} is not in campaign {spec['campaign_id']}")
            numbers.add(number)
        return sorted(numbers)
    if fraction >= 1:
        ranges = _merged_ranges(spec)
        if len(ranges) <= 1:
            return range(*ranges[0]) if ranges else range(0)
    return [n for start, end in _merged_ranges(spec) for n in range(start, end) if fraction_selected(n, fraction)]


def canceled_rows(spec: dict, numbers, skip: int, top: int) -> list[dict]:
    """One page of GetCanceledCampaignCustomers rows ``{"CustomerID", "ActionID", "PromoCode"}`` for the
    cancelled customer ``numbers``. ActionID is a string, as in Optimove's documented sample."""
    return [{"CustomerID": customer_id(number), "ActionID": str(spec["action_id"]),
             "PromoCode": _promo_field(promo_codes_for(spec, number), skip + offset)}
            for offset, number in enumerate(numbers[skip:skip + max(0, top)])]


def action_ended_count(spec: dict, day: str) -> int:
    """How many GetCustomersActionEndedByDate rows the campaign has on ``day`` (YYYY-MM-DD)."""
    if spec.get("action_end_date") != day:
        return 0
    return spec["customers_per_channel"] * max(1, len(spec["channels"]))


def action_ended_rows(spec: dict, day: str, skip: int, top: int) -> list[dict]:
    """One page of the campaign's GetCustomersActionEndedByDate rows on ``day``: every customer of
    every channel, channel by channel (ChannelID 0 when the campaign has no channels)."""
    n = spec["customers_per_channel"]
    last = min(skip + max(0, top), action_ended_count(spec, day))
    rows = []
    for index in range(skip, last):
        channel_index, position = divmod(index, n)
        channel = spec["channels"][channel_index] if spec["channels"] else 0
        number = _channel_start(spec, channel_index) + position if spec["channels"] else position
        rows.append({"CustomerID": customer_id(number), "ActionID": spec["action_id"], "ChannelID": channel,
                     "Date": day, "Duration": spec["duration"], "TargetGroupID": spec["target_group_id"]})
    return rows
