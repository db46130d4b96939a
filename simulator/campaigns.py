"""Campaign specs for the fake Optimove: validation and deterministic row generation.

A spec describes a multi-channel campaign without listing its customers. Channel index k
holds customer numbers ``start_k .. start_k + n - 1`` with
``start_k = round(k * n * (1 - overlap))``; rows are computed on demand, page by page.
"""

from __future__ import annotations

from typing import Any

MAX_CUSTOMER_NUMBER = 10**8
SCHEDULE_TIME = "2026-11-27 10:00:00"
LIST_PROMO_EVERY = 7
DEFAULTS = {
    "channels": [504, 505, 506],
    "overlap": 0.0,
    "codes": ["WB23"],
    "multi_code_every": 0,
}


class SpecError(ValueError):
    """A campaign spec is malformed; the message says which field and why."""


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def validate_spec(raw: Any) -> dict:
    """Return a normalised copy of a campaign spec, or raise SpecError naming the bad field."""
    if not isinstance(raw, dict):
        raise SpecError("spec must be a JSON object")
    unknown = set(raw) - {"campaign_id", "customers_per_channel", *DEFAULTS}
    if unknown:
        raise SpecError(f"unknown fields: {sorted(unknown)}")
    spec = {**DEFAULTS, **raw}
    if "campaign_id" not in raw or not _is_int(spec["campaign_id"]) or spec["campaign_id"] <= 0:
        raise SpecError("campaign_id must be a positive integer")
    if not _is_int(spec.get("customers_per_channel")) or spec["customers_per_channel"] < 0:
        raise SpecError("customers_per_channel must be a non-negative integer")
    channels = spec["channels"]
    if (not isinstance(channels, list) or not channels
            or not all(_is_int(c) and c > 0 for c in channels) or len(set(channels)) != len(channels)):
        raise SpecError("channels must be a non-empty list of distinct positive integers")
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
    if _channel_start(spec, len(channels) - 1) + spec["customers_per_channel"] > MAX_CUSTOMER_NUMBER:
        raise SpecError("campaign too large: customer numbers must stay below 10**8")
    return spec


def _channel_start(spec: dict, index: int) -> int:
    return round(index * spec["customers_per_channel"] * (1 - spec["overlap"]))


def _merged_ranges(spec: dict) -> list[tuple[int, int]]:
    n = spec["customers_per_channel"]
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
    total = 0
    for start, end in _merged_ranges(spec):
        total += end - start
        if every > 0 and extra_codes:
            total += extra_codes * ((end - 1) // every - (start - 1) // every)
    return total


def customers_per_channel(spec: dict) -> dict[int, int]:
    """Map each channel id to its number of customers."""
    return {channel: spec["customers_per_channel"] for channel in spec["channels"]}


def promo_codes_for(spec: dict, number: int) -> list[str]:
    """The promo codes a customer number holds in this campaign."""
    every = spec["multi_code_every"]
    if every > 0 and number % every == 0:
        return list(spec["codes"])
    return [spec["codes"][0]]


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
            "ActionID": 1,
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
