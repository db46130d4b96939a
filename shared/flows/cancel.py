"""Cancellation (EventTypeID 4): Optimove cancelled a processed campaign.

1. Optimove says campaign C was cancelled (EventTypeID 4) and keeps its list of affected
   customers for 2 hours.
2. At once, in the notification's transaction, C's pending work stops: its running runs end
   `cancelled` (no further page), its claimed grants and its claimed or waiting sends become
   `cancelled` (never delivered). A batch already in flight is settled as it answers.
3. We page through GetCanceledCampaignCustomers(CampaignID=C): each listed customer is
   remembered, and each grant already made to them gets one revoke (`revokes.py`), delivered
   through the bonus adapter's `revoke`. A grant that settles `granted` later (that in-flight
   batch) is revoked too, when it settles or, failing that, by the sweeper.
4. A second EventTypeID 4 for C is the same notification (its dedupe key is the campaign), and
   would find nothing left to stop or revoke anyway.
"""
from __future__ import annotations

import logging
from typing import Any

from shared import metrics, repository as repo
from shared.flows import paging
from shared.flows.base import Flow, Outcome, Pages
from shared.flows.revokes import REVOKES
from shared.optimove.rows import customer_codes

log = logging.getLogger(__name__)

SOURCE = "cancellation"


def listed_customers(rows: list[Any], run: dict, settings) -> list[str]:
    """The customers of a page of the cancellation list (remembered as the page is claimed)."""
    return sorted({found[0] for found in map(customer_codes, rows) if found is not None})


class CancellationList(type(REVOKES)):
    """The revoke ledger, fed by the pages of a cancellation list: it also remembers who is on it."""

    def claim(self, conn, scope, claims, rows=False):
        repo.add_cancelled_customers(conn, scope.campaign_id, claims)
        return super().claim(conn, scope, claims, rows)


PAGES = Pages(
    category="customers",
    function="GetCanceledCampaignCustomers",
    params=lambda run, settings: {"CampaignID": run["campaign_id"]},
    ledger=CancellationList(),
    source=SOURCE,
    claims=listed_customers,
)


def campaign_cancelled(rt, conn, notification: dict) -> Outcome:
    """Stop the campaign's pending work now, then page its cancellation list to revoke what was granted."""
    campaign_id = notification["campaign_id"]
    stopped = repo.cancel_pending(conn, campaign_id, f"campaign {campaign_id} cancelled (EventTypeID 4)")
    for run in stopped["ended_runs"]:
        metrics.run_row_ended(conn, run)
    log.warning("campaign %s cancelled: %d run(s) stopped, %d grant(s) and %d send(s) will not be delivered",
                campaign_id, stopped["runs"], stopped["grants"], stopped["sends"])
    outcome = paging.start_run(conn, notification, FLOW)
    outcome.reason = (f"stopped {stopped['runs']} run(s), {stopped['grants']} pending grant(s), "
                      f"{stopped['sends']} pending send(s)")
    return outcome


FLOW = Flow(name="cancellation", title="cancellation of a campaign", start=campaign_cancelled, pages=PAGES)
