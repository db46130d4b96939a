"""Listener payload schemas (marshmallow) for Optimove notifications.

Tolerant in what we accept (optimove-protocol.md §4.5): keys in any casing, ids as numbers or
numeric strings, timestamps with or without seconds, unknown keys kept. The result is a
`Notification` with the fields the flows need and the dedupe key of guarantee 2.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Mapping

from marshmallow import EXCLUDE, Schema, ValidationError, fields, pre_load, validates_schema

from shared.optimove.rows import parse_optimove_time, parse_promo_codes

SUPPORTED_EVENT_TYPES = (1, 2, 3, 4, 5, 11, 13)

# canonical key for every lower-cased spelling we know of
_CANONICAL = {
    "eventtypeid": "EventTypeID",
    "eventtype": "EventTypeID",
    "timestamp": "TimeStamp",
    "campaignid": "CampaignID",
    "channelid": "ChannelID",
    "clearancerequiredby": "ClearanceRequiredBy",
    "customerid": "CustomerID",
    "templateid": "TemplateID",
    "promocode": "PromoCode",
    "promocodes": "PromoCode",
}


def parse_timestamp(value: Any) -> datetime:
    """Parse Optimove's `YYYY-MM-DD HH:MM[:SS[.fff]]` (also ISO 8601 with T, Z or an offset)."""
    if not isinstance(value, str) or not value.strip():
        raise ValidationError("expected a date-time string such as '2022-09-19 05:04:54'")
    try:
        return parse_optimove_time(value)
    except ValueError as exc:
        raise ValidationError(str(exc)) from None


class LenientInt(fields.Integer):
    """An integer that may arrive as a numeric string (`"1359"`); booleans and fractions refused."""

    default_error_messages = {"invalid": "expected an integer or a numeric string"}

    def _deserialize(self, value, attr, data, **kwargs):
        if isinstance(value, bool) or isinstance(value, float) and not value.is_integer():
            raise self.make_error("invalid")
        if isinstance(value, str):
            value = value.strip()
            if not value.lstrip("-").isdigit():
                raise self.make_error("invalid")
        result = super()._deserialize(value, attr, data, **kwargs)
        if not 0 <= result <= BIGINT_MAX:
            raise ValidationError(f"expected an id between 0 and {BIGINT_MAX}")
        return result


BIGINT_MAX = 2 ** 63 - 1


class Timestamp(fields.Field):
    """A lenient Optimove timestamp."""

    def _deserialize(self, value, attr, data, **kwargs):
        return parse_timestamp(value)


class IdString(fields.Field):
    """A customer id: a non-empty string (numbers accepted and turned into strings)."""

    def _deserialize(self, value, attr, data, **kwargs):
        if isinstance(value, bool) or not isinstance(value, (str, int)) or not str(value).strip():
            raise ValidationError("expected a non-empty string")
        return str(value).strip()


class PromoCodes(fields.Field):
    """A list of codes or a comma-separated string."""

    def _deserialize(self, value, attr, data, **kwargs):
        if not isinstance(value, (str, list, tuple)) or any(isinstance(v, (dict, list)) for v in
                                                            (value if isinstance(value, (list, tuple)) else [])):
            raise ValidationError("expected a string or a list of strings")
        return parse_promo_codes(value)


REQUIRED = {
    1: ("CampaignID",),
    2: ("TimeStamp",),
    3: ("TimeStamp",),
    4: ("CampaignID",),
    5: ("CampaignID", "ClearanceRequiredBy"),
    11: ("CampaignID", "CustomerID"),
    13: ("CampaignID", "ChannelID"),
}


class NotificationSchema(Schema):
    """One Optimove listener notification, keys matched case-insensitively."""

    class Meta:
        unknown = EXCLUDE

    EventTypeID = LenientInt(required=True)
    TimeStamp = Timestamp(load_default=None)
    CampaignID = LenientInt(load_default=None)
    ChannelID = LenientInt(load_default=None)
    ClearanceRequiredBy = Timestamp(load_default=None)
    CustomerID = IdString(load_default=None)
    TemplateID = LenientInt(load_default=None)
    PromoCode = PromoCodes(load_default=list)

    @pre_load
    def canonical_keys(self, data, **kwargs):
        """Map every known key, in any casing, to its canonical spelling."""
        if not isinstance(data, Mapping):
            raise ValidationError("expected a JSON object", "_schema")
        out: dict[str, Any] = {}
        for key, value in data.items():
            canon = _CANONICAL.get(str(key).replace("_", "").lower())
            if canon and value is not None:
                if canon in out and out[canon] != value:
                    raise ValidationError(f"given twice with different values (as {key!r})", canon)
                out[canon] = value
        return out

    @validates_schema
    def required_for_type(self, data, **kwargs):
        """Each event type needs its own fields (see REQUIRED)."""
        event_type = data.get("EventTypeID")
        if event_type not in SUPPORTED_EVENT_TYPES:
            raise ValidationError(
                f"unsupported event type {event_type}; expected one of "
                + ", ".join(map(str, SUPPORTED_EVENT_TYPES)), "EventTypeID")
        missing = {name: ["required for EventTypeID %d" % event_type]
                   for name in REQUIRED[event_type] if data.get(name) in (None, "")}
        if missing:
            raise ValidationError(missing)


_SCHEMA = NotificationSchema()  # building a Schema deep-copies its fields; one instance is reusable


@dataclass(frozen=True)
class Notification:
    """A validated notification: the fields the flows use, plus its dedupe key."""

    event_type: int
    dedupe_key: str
    campaign_id: int | None = None
    channel_id: int | None = None
    timestamp: datetime | None = None
    clearance_required_by: datetime | None = None
    customer_id: str | None = None
    template_id: int | None = None
    promo_codes: list[str] = field(default_factory=list)


def canonical_body(data: Mapping[str, Any], body: Mapping[str, Any]) -> str:
    """The body as sorted, compact JSON: known fields by canonical name and parsed value, other keys
    lower-cased, so casing or a numeric string id does not make a new event."""
    out: dict[str, Any] = {str(k).lower(): v for k, v in body.items()
                           if str(k).replace("_", "").lower() not in _CANONICAL}
    for name, value in data.items():
        if value not in (None, []):
            out[name] = value.isoformat() if isinstance(value, datetime) else value
    return json.dumps(out, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=str)


def dedupe_key(data: Mapping[str, Any], body: Mapping[str, Any]) -> str:
    """The key under which a repeat delivery of the same notification is recognised."""
    kind = data["EventTypeID"]
    if kind == 13:
        return f"13:{data['CampaignID']}:{data['ChannelID']}"
    if kind in (1, 4, 5):
        return f"{kind}:{data['CampaignID']}"
    if kind in (2, 3):
        return f"{kind}:{data['TimeStamp'].isoformat()}"
    return "11:" + hashlib.sha256(canonical_body(data, body).encode()).hexdigest()


def parse_notification(body: Any, event_type_hint: Any = None) -> Notification:
    """Validate a decoded JSON body; `event_type_hint` (from the listener URL) fills a missing EventTypeID.

    Raises `marshmallow.ValidationError` with per-field messages.
    """
    if not isinstance(body, Mapping):
        raise ValidationError({"_schema": ["expected a JSON object"]})
    source = dict(body)
    if event_type_hint not in (None, "") and not any(
            str(k).replace("_", "").lower() in ("eventtypeid", "eventtype") for k in source):
        source["EventTypeID"] = event_type_hint
    data = _SCHEMA.load(source)
    return Notification(
        event_type=data["EventTypeID"],
        dedupe_key=dedupe_key(data, body),
        campaign_id=data["CampaignID"],
        channel_id=data["ChannelID"],
        timestamp=data["TimeStamp"],
        clearance_required_by=data["ClearanceRequiredBy"],
        customer_id=data["CustomerID"],
        template_id=data["TemplateID"],
        promo_codes=data["PromoCode"],
    )


@dataclass(frozen=True)
class Trigger:
    """A real-time trigger (EventTypeID 11): who, what, and the trigger event's own parameters."""

    campaign_id: int
    channel_id: int | None
    customer_id: str
    template_id: int | None
    promo_codes: list[str]
    attributes: dict[str, Any]


def parse_trigger(payload: Mapping[str, Any]) -> Trigger:
    """The trigger of a stored EventTypeID 11 payload; `attributes` are the fields other than the known ones
    (EventTypeID, TimeStamp, CampaignID, ChannelID, CustomerID, TemplateID, PromoCode in any casing), as sent."""
    data = _SCHEMA.load(dict(payload))
    attributes = {str(k): v for k, v in payload.items() if str(k).replace("_", "").lower() not in _CANONICAL}
    return Trigger(data["CampaignID"], data["ChannelID"], data["CustomerID"], data["TemplateID"],
                   data["PromoCode"], attributes)
