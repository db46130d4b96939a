"""Flow 5 — bonus for real-time campaigns (EventTypeID 11 on a bonus channel).

1. Optimove says a customer met a real-time campaign's trigger, with the campaign's promo code(s).
2. Each (customer, promo code) is claimed once per notification (or once per campaign under
   `RELAY_REALTIME_GRANT_POLICY=once_per_campaign`).
3. The claimed ones are granted at once, in this task, on the `realtime` queue.
"""
from __future__ import annotations

from shared.dispatch import REALTIME_SOURCE
from shared.flows.base import Flow, Outcome
from shared.flows.grants import GRANTS
from shared.flows.ledger import Scope
from shared.schemas import parse_trigger


def customer_triggered(rt, conn, notification: dict) -> Outcome:
    """Claim the trigger's promo codes for its customer and grant them now."""
    trigger = parse_trigger(notification["payload"])
    if not trigger.promo_codes:
        return Outcome("ignored", f"EventTypeID 11 on bonus channel {trigger.channel_id} carries no promo code")
    policy = rt.settings.realtime_grant_policy
    scope = Scope(trigger.campaign_id, trigger.channel_id, REALTIME_SOURCE, notification_id=notification["id"],
                  per_notification=policy == "once_per_notification")
    rows = GRANTS.claim(conn, scope, [(trigger.customer_id, code) for code in trigger.promo_codes], rows=True)
    if not rows:
        return Outcome("done", f"customer {trigger.customer_id} already holds these codes of campaign "
                               f"{trigger.campaign_id} ({policy})")
    return Outcome("done", deliver_now=[(GRANTS, rows)])


FLOW = Flow(name="realtime_bonus", title="flow 5, bonus for real-time campaigns", start=customer_triggered)
