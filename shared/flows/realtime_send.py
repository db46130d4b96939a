"""Flow 2 — real-time execution (EventTypeID 11 on a send channel).

1. Optimove says a customer met a real-time campaign's trigger: campaign, channel, template,
   and the trigger event's parameters.
2. One send is claimed per (notification, customer, template), so a redelivery never sends twice.
3. It goes to the send service at once, in this task, on the `realtime` queue, with the
   payload's other fields as `attributes` and its promo codes, if any.
"""
from __future__ import annotations

from shared.dispatch import REALTIME_SOURCE
from shared.flows.base import Flow, Outcome
from shared.flows.ledger import Scope
from shared.flows.sends import SENDS, SendClaim
from shared.schemas import parse_trigger


def customer_triggered(rt, conn, notification: dict) -> Outcome:
    """Claim the trigger's send and hand it to the send service now."""
    trigger = parse_trigger(notification["payload"])
    if trigger.channel_id is None:
        return Outcome("ignored", "EventTypeID 11 for a send has no ChannelID")
    if trigger.template_id is None:
        return Outcome("ignored", f"EventTypeID 11 on send channel {trigger.channel_id} has no TemplateID")
    scope = Scope(trigger.campaign_id, trigger.channel_id, REALTIME_SOURCE, notification_id=notification["id"],
                  per_notification=True)
    claim = SendClaim(trigger.customer_id, trigger.template_id, trigger.attributes, trigger.promo_codes)
    return Outcome("done", deliver_now=[(SENDS, SENDS.claim(conn, scope, [claim], rows=True))])


FLOW = Flow(name="realtime_send", title="flow 2, real-time execution", start=customer_triggered)
