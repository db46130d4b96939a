"""The revoke ledger: grants taken back because their campaign was cancelled, each at most once.

A revoke row is claimed per grant (unique `grant_id`) for the granted grants of customers on a
campaign's cancellation list, and delivered to the bonus adapter's `revoke` like any ledger row
(batches, retries with backoff, sweeps, re-drive). When it is revoked, its grant reads `revoked`;
a bonus adapter that cannot revoke (no `BONUS_REVOKE_URL`, or no `revoke`) leaves the grant
`revoke_unsupported` and the revoke `rejected` with that reason.
"""
from __future__ import annotations

import logging

from shared import dispatch, repository as repo
from shared.adapters.bonus import RevokeItem
from shared.adapters.http import ItemResult
from shared.db import unit_of_work
from shared.flows.ledger import Ledger, Scope

log = logging.getLogger(__name__)

UNSUPPORTED = "revoke_unsupported: the bonus adapter cannot revoke (set BONUS_REVOKE_URL)"


class Revokes(Ledger):
    """Claims are the customers on a cancellation list; each of their granted grants gets one revoke."""

    table = repo.REVOKES
    task = dispatch.REVOKE_BATCH
    noun = "revoke"
    settings_prefix = "bonus"

    def claim(self, conn, scope: Scope, claims: list, rows: bool = False) -> repo.Claimed:
        """Revokes for the granted grants of the customers `claims`, none for a grant already revoked."""
        return super().claim(conn, scope, repo.granted_to(conn, scope.campaign_id, sorted(set(claims))), rows)

    def claim_late(self, conn, scope: Scope, customers: list[str]) -> repo.Claimed:
        """Revokes for grants that settled `granted` after the cancellation list was read (a batch in flight
        when the cancellation landed), for the customers of `customers` on that list."""
        found = repo.granted_to(conn, scope.campaign_id, sorted(set(customers)), cancelled_only=True)
        return super().claim(conn, scope, found) if found else repo.Claimed()

    def claim_grants(self, conn, scope: Scope, grants: list[tuple]) -> repo.Claimed:
        """Revokes for the given (grant id, customer, code, reference) grants of the scope's campaign."""
        return super().claim(conn, scope, grants)

    def columns(self, scope: Scope, claims: list[tuple]) -> dict[str, tuple[str, list]]:
        claims = sorted(claims)  # by grant id, the unique key
        return {"customer_id": ("text", [c for _, c, _, _ in claims]),
                "promo_code": ("text", [p for _, _, p, _ in claims]),
                "grant_id": ("bigint", [g for g, _, _, _ in claims]),
                "grant_reference": ("text", [r for _, _, _, r in claims]),
                "idempotency_key": ("text", scope.keys(("revoke", str(g)) for g, _, _, _ in claims))}

    def item(self, row: repo.ClaimedRow) -> RevokeItem:
        v = row.values
        return RevokeItem(row.idempotency_key, v["campaign_id"], v["customer_id"], v["promo_code"],
                          v["grant_reference"], v["grant_id"])

    def call(self, rt, items: list[RevokeItem]) -> list[ItemResult]:
        if not getattr(rt.bonus, "can_revoke", hasattr(rt.bonus, "revoke")):
            with unit_of_work(rt.engine) as conn:
                repo.set_grant_status(conn, [i.grant_id for i in items], "revoke_unsupported", UNSUPPORTED)
            return [ItemResult(i.idempotency_key, "rejected", reason=UNSUPPORTED) for i in items]
        results = rt.bonus.revoke(items)
        revoked = {r.idempotency_key for r in results if r.status == "revoked"}
        with unit_of_work(rt.engine) as conn:  # the bonus system took them back: the grants say so
            repo.set_grant_status(conn, [i.grant_id for i in items if i.idempotency_key in revoked], "revoked")
        return results


REVOKES = Revokes()
