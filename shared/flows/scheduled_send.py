"""Flow 1 — pre-scheduled channel execution (EventTypeID 13 on a send channel).

0. Set up once: the channel's templates are in Optimove (`relay templates sync`).
1. Optimove says campaign C is executed on send channel X (EventTypeID 13).
2. We page through GetCustomerSendDetailsByChannel(ChannelID=X, CampaignID=C, CustomerAttributes=
   the attribute names the channel config lists for X).
3. Each (customer, template) is claimed once per campaign and channel, with its attributes and
   its ScheduledTime (in `OPTIMOVE_TIMEZONE`).
4. Sends already due go to the send service at once; later ones wait in the ledger until the beat
   job releases them when due (Postgres' clock), so none goes out early.
5. When the run is complete, the sends per template go back to Optimove (UpdateCampaignMetrics,
   with `OPTIMOVE_REPORT_METRICS`).
"""
from __future__ import annotations

import logging
from typing import Any

from shared.flows import paging
from shared.flows.base import Flow, Outcome, Pages
from shared.flows.sends import SENDS, SendClaim
from shared.optimove.rows import attribute_values, parse_execution_row, parse_scheduled_time

log = logging.getLogger(__name__)

SOURCE = "scheduled"


def audience(run: dict, settings) -> dict[str, Any]:
    """The query of GetCustomerSendDetailsByChannel: channel, campaign and the channel's attribute names."""
    params: dict[str, Any] = {"ChannelID": run["channel_id"], "CampaignID": run["campaign_id"]}
    names = settings.channels.attribute_names(run["channel_id"])
    if names:
        params["CustomerAttributes"] = ";".join(names)
    return params


def sends_of_page(rows: list[Any], run: dict, settings) -> list[SendClaim]:
    """One send per row with a customer and a template; rows without either, or with a ScheduledTime that
    is not a date, are left out and logged (sending them at a guessed time could send early)."""
    names = settings.channels.attribute_names(run["channel_id"])
    claims: list[SendClaim] = []
    skipped: dict[str, int] = {}
    for raw in rows:
        row = parse_execution_row(raw)
        if row is None or row.template_id is None:
            skipped["no CustomerID or TemplateID"] = skipped.get("no CustomerID or TemplateID", 0) + 1
            continue
        try:
            due = parse_scheduled_time(row.schedule_time, settings.optimove_timezone)
        except ValueError:
            skipped["ScheduledTime not a date"] = skipped.get("ScheduledTime not a date", 0) + 1
            continue
        claims.append(SendClaim(row.customer_id, row.template_id, attribute_values(row.attributes, names),
                                scheduled_time=due))
    if skipped:
        log.error("run %s: %s rows left out", run["id"], ", ".join(f"{n} ({why})" for why, n in skipped.items()))
    return claims


PAGES = Pages(
    category="customers",
    function="GetCustomerSendDetailsByChannel",
    params=audience,
    ledger=SENDS,
    source=SOURCE,
    claims=sends_of_page,
)


def channel_executed(rt, conn, notification: dict) -> Outcome:
    """Start paging the channel's audience."""
    return paging.start_run(conn, notification, FLOW)


FLOW = Flow(name="scheduled_send", title="flow 1, pre-scheduled channel execution", start=channel_executed,
            pages=PAGES)
