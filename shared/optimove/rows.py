"""Customer rows from Optimove's campaign customer lists, parsed leniently.

Optimove's casing and shapes vary (`CustomerID`/`customerId`, `ScheduleTime`/`ScheduledTime`,
`PromoCode` as a comma-separated string or a list, `CustomerAttributes` as an array or
`CustomerAttribute` as a joined string), so every variant seen in the wild is accepted.
"""
from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any, Mapping
from zoneinfo import ZoneInfo


@dataclass
class ExecutionRow:
    """One customer of a campaign execution (GetCustomerExecutionDetailsByCampaign and friends)."""

    customer_id: str
    promo_codes: list[str]
    channel_id: int | None = None
    template_id: int | None = None
    action_id: int | None = None
    schedule_time: str | None = None
    attributes: list | None = None


def lower_keys(row: Mapping[str, Any]) -> dict[str, Any]:
    """The row's keys lower-cased and without underscores (`CustomerID`, `customer_id` -> `customerid`)."""
    return {str(k).lower().replace("_", ""): v for k, v in row.items()}


def _first(row: dict[str, Any], *names: str) -> Any:
    for name in names:
        if row.get(name) is not None:
            return row[name]
    return None


def parse_int(value: Any) -> int | None:
    """An int from an int or a numeric string (`"504"`, `" 7 "`, `12.0`); None otherwise."""
    if value is None or isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, float):
        return int(value) if value.is_integer() else None
    try:
        return int(str(value).strip())
    except ValueError:
        return None


def parse_promo_codes(value: Any) -> list[str]:
    """Promo codes from a comma-separated string or a list: trimmed, blanks dropped, order kept, no repeats."""
    if value is None:
        return []
    parts = value.split(",") if isinstance(value, str) else [str(v) for v in value if v is not None]
    codes: list[str] = []
    for part in parts:
        code = part.strip()
        if code and code not in codes:
            codes.append(code)
    return codes


def _attributes(row: dict[str, Any], delimiter: str) -> list | None:
    value = _first(row, "customerattributes", "customerattribute")
    if value is None:
        return None
    if isinstance(value, str):
        return value.split(delimiter)
    return list(value) if isinstance(value, (list, tuple)) else [value]


def parse_execution_row(row: Mapping[str, Any], delimiter: str = ";") -> ExecutionRow | None:
    """An `ExecutionRow` from one API row, or None when the row has no usable CustomerID.

    `delimiter` splits a `CustomerAttribute(s)` value that arrives as one joined string.
    """
    if not isinstance(row, Mapping):
        return None
    data = lower_keys(row)
    raw_id = data.get("customerid")
    if raw_id is None or isinstance(raw_id, bool) or isinstance(raw_id, (dict, list)):
        return None
    customer_id = str(raw_id).strip()
    if not customer_id:
        return None
    schedule = _first(data, "scheduletime", "scheduledtime")
    return ExecutionRow(
        customer_id=customer_id,
        promo_codes=parse_promo_codes(_first(data, "promocode", "promocodes")),
        channel_id=parse_int(data.get("channelid")),
        template_id=parse_int(data.get("templateid")),
        action_id=parse_int(data.get("actionid")),
        schedule_time=(str(schedule).strip() or None) if schedule is not None else None,
        attributes=_attributes(data, delimiter),
    )


_ID_KEYS = ("CustomerID", "customerId", "customerID", "CustomerId")
_CODE_KEYS = ("PromoCode", "promoCode", "PromoCodes", "promoCodes")


def customer_codes(row: Any) -> tuple[str, list[str]] | None:
    """(customer id, promo codes) of a row: the paging hot path.

    Rows spelled as Optimove usually spells them are read directly; anything else goes through
    `parse_execution_row`, so both give the same answer.
    """
    if type(row) is dict:
        raw = next((row[k] for k in _ID_KEYS if k in row), None)
        if type(raw) is str and raw and not raw[0].isspace() and not raw[-1].isspace():
            codes = next((row[k] for k in _CODE_KEYS if row.get(k) is not None), None)
            if codes is None:
                return raw, []
            if type(codes) is str and "," not in codes:
                code = codes.strip()
                return raw, [code] if code else []
            return raw, parse_promo_codes(codes)
    parsed = parse_execution_row(row)
    return (parsed.customer_id, parsed.promo_codes) if parsed else None


_TIME_PATTERNS = ("%Y-%m-%d %H:%M:%S", "%Y-%m-%d %H:%M", "%Y-%m-%dT%H:%M:%S", "%Y-%m-%dT%H:%M",
                  "%Y-%m-%d %H:%M:%S.%f", "%Y/%m/%d %H:%M:%S", "%Y/%m/%d %H:%M")


def parse_optimove_time(text: str) -> datetime:
    """Optimove's `YYYY-MM-DD HH:MM[:SS[.fff]]` (also ISO 8601 with T, Z or an offset), naive unless the
    text carries an offset. Raises ValueError naming the value otherwise."""
    text = text.strip()
    iso = text[:-1] + "+00:00" if text.endswith("Z") else text
    try:
        return datetime.fromisoformat(iso)
    except ValueError:
        pass
    for pattern in _TIME_PATTERNS:
        try:
            return datetime.strptime(text, pattern)
        except ValueError:
            continue
    raise ValueError(f"not a date-time: {text!r} (expected 'YYYY-MM-DD HH:MM[:SS]')")


def in_timezone(when: datetime, timezone: str = "UTC") -> datetime:
    """`when` as an aware datetime: a naive one is read in `timezone`, an aware one keeps its offset."""
    return when if when.tzinfo is not None else when.replace(tzinfo=_zone(timezone))


def parse_scheduled_time(value: str | None, timezone: str = "UTC") -> datetime | None:
    """An aware datetime from Optimove's `YYYY-MM-DD HH:MM[:SS]` in `timezone` (values carrying an offset
    or `Z` keep theirs); None for an empty value. Raises ValueError for anything else."""
    if value is None or not str(value).strip():
        return None
    return in_timezone(parse_optimove_time(str(value)), timezone)


_ZONES: dict[str, ZoneInfo] = {}


def _zone(name: str) -> ZoneInfo:
    zone = _ZONES.get(name)
    if zone is None:
        zone = _ZONES[name] = ZoneInfo(name)
    return zone


def attribute_values(values: list | None, names: tuple[str, ...]) -> dict[str, Any]:
    """The attributes of a row as an object keyed by the configured `names`.

    The list form maps by position. A single joined string that `_attributes` split on `;` but
    that holds `,`-joined values instead (a delimiter Optimove chose) is split again on `,`.
    Missing values are null; values beyond the names are dropped.
    """
    if not names:
        return {}
    values = list(values or [])
    if len(values) == 1 and len(names) > 1 and isinstance(values[0], str) and "," in values[0]:
        values = values[0].split(",")
    values += [None] * (len(names) - len(values))
    return {name: (v.strip() if isinstance(v, str) else v) for name, v in zip(names, values)}
