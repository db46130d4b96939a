"""Fake send service: sends a template to a customer, batch and single, with injectable faults.

``POST /send/sends`` takes ``{"sends": [...]}`` and answers ``{"results": [{"idempotency_key",
"status": "sent"|"rejected"|"retry", "reference"?, "reason"?}]}``; ``POST /send/send`` takes one
send with an ``Idempotency-Key`` header and answers 201, 409 (same key again), 422 (rejected)
or 503 (injected failure). Sends of a template in ``reject_template_ids`` are rejected.
The ledger key of a send is (campaign_id, channel_id, customer_id, template_id, notification_id).

A send with a ``scheduled_time`` (ISO-8601 with a UTC offset; null for real-time sends) is due
then: the summary counts sends received before it (``early``, every call counts, no tolerance)
and how late each ledger key's first call came (``late_seconds``: p50, p99, max).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

from simulator.ledger import InvalidItem, idempotency_key_of, int_field, text_field
from simulator.peer import FakePeer, PeerKind, fault_config


@dataclass(slots=True)
class Send:
    """One send request as the send service receives it."""

    idempotency_key: str
    campaign_id: int
    channel_id: int | None
    template_id: int
    customer_id: str
    attributes: dict
    promo_codes: list[str]
    scheduled_time: str | None = None
    source: Any = None
    notification_id: int | None = None
    due_at: float | None = None

    @property
    def ledger_key(self) -> tuple:
        """What the send is about: (campaign, channel, customer, template, notification)."""
        return (self.campaign_id, self.channel_id, self.customer_id, self.template_id, self.notification_id)

    @property
    def detail(self) -> dict:
        """What the ledger keeps of the first send of a key: its attributes."""
        return self.attributes


def due_at_of(scheduled_time: str | None, key: str) -> float | None:
    """Epoch seconds of a ``scheduled_time`` (None stays None); InvalidItem unless it is ISO-8601
    with a UTC offset."""
    if scheduled_time is None:
        return None
    try:
        when = datetime.fromisoformat(scheduled_time)
    except ValueError:
        when = None
    if when is None or when.tzinfo is None:
        raise InvalidItem(f"{key}: scheduled_time must be an ISO-8601 time with a UTC offset or null, "
                          f"got {scheduled_time!r}")
    return when.timestamp()


def parse_send(raw: object, header_key: str | None = None) -> Send:
    """Build a Send from JSON or raise InvalidItem naming the bad field; unknown fields are ignored."""
    key = idempotency_key_of(raw, header_key, "send")
    attributes = raw.get("attributes")
    if not isinstance(attributes, dict):
        raise InvalidItem(f"{key}: attributes must be an object")
    codes = raw.get("promo_codes")
    if not isinstance(codes, list) or not all(isinstance(code, str) for code in codes):
        raise InvalidItem(f"{key}: promo_codes must be a list of strings")
    scheduled_time = raw.get("scheduled_time")
    if scheduled_time is not None and not isinstance(scheduled_time, str):
        raise InvalidItem(f"{key}: scheduled_time must be a string or null")
    return Send(key, int_field(raw, "campaign_id", key), int_field(raw, "channel_id", key, optional=True),
                int_field(raw, "template_id", key), text_field(raw, "customer_id", key), attributes, codes,
                scheduled_time, raw.get("source"), int_field(raw, "notification_id", key, optional=True),
                due_at_of(scheduled_time, key))


SendConfig = fault_config("SendConfig", "reject_template_ids", int)


def _rejected_template(send: Send, rejects: frozenset) -> str | None:
    return f"template {send.template_id} is not accepted" if send.template_id in rejects else None


SEND = PeerKind(name="send service", path="/send", item="send", applied_status="sent", reference_prefix="SND",
                customer_index=2, config=SendConfig, parse=parse_send, reject_reason=_rejected_template,
                summary_names={"duplicates": "duplicate_sends"}, timed=True)


def create_send_app(**settings) -> FakePeer:
    """Build a fake send service (settings: the SendConfig fields); serve it with ``make_server``.

    Its ledger summary says ``applied``, ``unique_keys``, ``duplicate_sends``, ``calls``,
    ``items_received``, ``rejected``, ``faults_injected``, ``timed_keys`` (sends with a
    scheduled_time), ``early`` and ``late_seconds`` ({p50, p99, max, count}); with ``full``, also
    ``entries`` (a timed send's entry has ``due_at`` and ``early``, every send's ``detail`` holds
    its attributes).
    """
    return FakePeer.build(SEND, **settings)
