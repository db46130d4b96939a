"""The grant ledger: promo codes granted to customers in the bonus system, once per scope.

Campaign flows are unique per (campaign, customer, promo code) across all their channels;
real-time grants per notification, or per campaign under `RELAY_REALTIME_GRANT_POLICY=once_per_campaign`.
"""
from __future__ import annotations

from typing import Any

from shared import dispatch, repository as repo
from shared.adapters.bonus import GrantItem
from shared.flows.ledger import Ledger, Scope
from shared.flows.revokes import REVOKES
from shared.optimove.rows import customer_codes, parse_int


class Grants(Ledger):
    """Claims are (customer id, promo code) pairs, or (customer id, promo code, ActionID) triples from
    campaign pages (the ActionID lets promotion deactivation find the grant)."""

    table = repo.GRANTS
    task = dispatch.GRANT_BATCH
    noun = "grant"
    settings_prefix = "bonus"

    def columns(self, scope: Scope, claims: list[tuple]) -> dict[str, tuple[str, list]]:
        claims = sorted(claims, key=_unique_key)
        out = {"customer_id": ("text", [c[0] for c in claims]), "promo_code": ("text", [c[1] for c in claims]),
               "idempotency_key": ("text", scope.keys((c[0], c[1]) for c in claims))}
        if claims and len(claims[0]) > 2:
            out["action_id"] = ("bigint", [c[2] for c in claims])
        return out

    def item(self, row: repo.ClaimedRow) -> GrantItem:
        v = row.values
        return GrantItem(row.idempotency_key, v["campaign_id"], v["channel_id"], v["customer_id"], v["promo_code"],
                         row.source, v["scope"] or None)

    def call(self, rt, items: list[GrantItem]) -> list:
        return rt.bonus.grant(items)

    def settled(self, rt, conn, run_id, claimed):
        """A batch that was in flight when its campaign was cancelled: what it granted to customers on the
        cancellation list is revoked too."""
        campaign_id = claimed[0].values["campaign_id"]
        cancellation = repo.cancellation_run(conn, campaign_id)
        if cancellation is None:
            return []
        scope = Scope(campaign_id, None, "cancellation", run_id=cancellation)
        ids = REVOKES.claim_late(conn, scope, [row.values["customer_id"] for row in claimed])
        return REVOKES.deliveries(((cancellation, i, "cancellation") for i in ids), rt.settings)


GRANTS = Grants()


def _unique_key(claim: tuple) -> tuple:
    return claim[0], claim[1]


def codes_per_customer(rows: list[Any]) -> list[tuple[str, str, int | None]]:
    """(customer, code, ActionID) claims of a page of customer rows carrying `PromoCode` (skips rows without
    a customer)."""
    claims: list[tuple[str, str, int | None]] = []
    for row in rows:
        found = customer_codes(row)
        if found is not None:
            customer, codes = found
            action = row.get("ActionID") if type(row) is dict else None
            action = action if type(action) is int else parse_int(action)
            claims.extend((customer, code, action) for code in codes)
    return claims
