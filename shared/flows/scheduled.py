"""Flow 3 — bonus for scheduled campaigns (EventTypeID 13 on a bonus channel).

Optimove says a campaign went out on a channel. We page through
GetCustomerExecutionDetailsByCampaign(CampaignID, ChannelID), claim each (customer, promo code)
once per campaign — customers granted through another channel are skipped by the ledger — and
grant the claimed ones in the bonus system.
"""
from __future__ import annotations

from shared import dispatch, repository as repo
from shared.flows.inbox import Outcome, handles
from shared.flows.ledger import PagedFlow, register
from shared.optimove.rows import customer_codes

FLOW = "scheduled_bonus"


def _pairs(row: dict) -> list[tuple[str, str]] | None:
    found = customer_codes(row)
    if found is None:
        return None
    customer, codes = found
    return [(customer, code) for code in codes]


register(PagedFlow(
    name=FLOW,
    category="customers",
    function="GetCustomerExecutionDetailsByCampaign",
    params=lambda run: {"CampaignID": run["campaign_id"], "ChannelID": run["channel_id"]},
    pairs=_pairs,
))


@handles(13)
def channel_executed(rt, conn, notification: dict) -> Outcome:
    """Start a bonus run for the channel, or note that the channel sends instead of granting."""
    channel = notification["channel_id"]
    role = rt.settings.channels.role(channel)
    if role != "bonus":
        return Outcome("ignored", f"channel {channel} has role {role!r}; the send flow is not built yet")
    run_id, _ = repo.create_run(conn, notification["id"], FLOW, notification["campaign_id"], channel)
    return Outcome("done", follow_ups=[dispatch.fetch_page(run_id)])
