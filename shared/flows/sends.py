"""The send ledger: templates sent to customers through the send service, once per scope.

Campaign flows are unique per (campaign, channel, customer, template); real-time sends per
notification.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from shared import dispatch, repository as repo
from shared.adapters.send import SendItem
from shared.flows.ledger import Ledger, Scope


@dataclass(frozen=True)
class SendClaim:
    """One template to send to one customer, with the attributes and promo codes it carries."""

    customer_id: str
    template_id: int
    attributes: dict[str, Any] = field(default_factory=dict)
    promo_codes: list[str] = field(default_factory=list)
    scheduled_time: datetime | None = None


class Sends(Ledger):
    """Claims are `SendClaim`s; the channel is part of the unique key."""

    table = repo.SENDS
    task = dispatch.SEND_BATCH
    noun = "send"
    settings_prefix = "send"

    def columns(self, scope: Scope, claims: list[SendClaim]) -> dict[str, tuple[str, list]]:
        if scope.channel_id is None:
            raise ValueError("a send needs a channel")
        claims = sorted(claims, key=lambda c: (c.customer_id, c.template_id))
        return {
            "customer_id": ("text", [c.customer_id for c in claims]),
            "template_id": ("bigint", [c.template_id for c in claims]),
            "attributes": ("jsonb", [json.dumps(c.attributes, separators=(",", ":")) for c in claims]),
            "promo_codes": ("jsonb", [json.dumps(c.promo_codes) for c in claims]),
            "scheduled_time": ("timestamptz", [c.scheduled_time for c in claims]),
            "idempotency_key": ("text", scope.keys((str(scope.channel_id), c.customer_id, str(c.template_id))
                                                   for c in claims)),
        }

    def item(self, row: repo.ClaimedRow) -> SendItem:
        v = row.values
        when = v["scheduled_time"]
        return SendItem(row.idempotency_key, v["campaign_id"], v["channel_id"], v["template_id"], v["customer_id"],
                        v["attributes"], v["promo_codes"], when.isoformat() if when else None, row.source,
                        v["scope"] or None)

    def call(self, rt, items: list[SendItem]) -> list:
        return rt.send.send(items)


SENDS = Sends()
