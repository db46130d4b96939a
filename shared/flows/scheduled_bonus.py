"""Flow 3 — bonus for scheduled campaigns (EventTypeID 13 on a bonus channel).

1. Optimove says campaign C went out on channel X (EventTypeID 13).
2. We page through GetCustomerExecutionDetailsByCampaign(CampaignID=C, ChannelID=X).
3. Each (customer, promo code) is claimed once per campaign: customers granted through another
   channel of C are skipped by the ledger.
4. The claimed ones are granted in the bonus system.
"""
from __future__ import annotations

from shared.flows import grants, paging
from shared.flows.base import Flow, Outcome, Pages

PAGES = Pages(
    category="customers",
    function="GetCustomerExecutionDetailsByCampaign",
    params=lambda run, settings: {"CampaignID": run["campaign_id"], "ChannelID": run["channel_id"]},
    ledger=grants.GRANTS,
    source="scheduled_bonus",
    claims=lambda rows, run, settings: grants.codes_per_customer(rows),
)


def channel_executed(rt, conn, notification: dict) -> Outcome:
    """Start paging the channel's customers."""
    return paging.start_run(conn, notification, FLOW)


FLOW = Flow(name="scheduled_bonus", title="flow 3, bonus for scheduled campaigns", start=channel_executed,
            pages=PAGES)
