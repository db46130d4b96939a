"""The fake bonus system's ledger: grants applied once per idempotency key, counted per triple."""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field


@dataclass
class Grant:
    """One grant request as the bonus system receives it."""

    idempotency_key: str
    campaign_id: int | str
    customer_id: str
    promo_code: str
    channel_id: int | None = None
    source: str | None = None

    @property
    def triple(self) -> tuple:
        """The (campaign_id, customer_id, promo_code) the bonus is about."""
        return (self.campaign_id, self.customer_id, self.promo_code)


class InvalidGrant(ValueError):
    """A grant object is missing a field or has the wrong type."""


def parse_grant(raw: object, header_key: str | None = None) -> Grant:
    """Build a Grant from JSON; ``header_key`` (an Idempotency-Key header) takes precedence."""
    if not isinstance(raw, dict):
        raise InvalidGrant("a grant must be a JSON object")
    body_key = raw.get("idempotency_key")
    if header_key and body_key and header_key != body_key:
        raise InvalidGrant("Idempotency-Key header does not match the body's idempotency_key")
    key = header_key or body_key
    if not isinstance(key, str) or not key:
        raise InvalidGrant("idempotency_key is required")
    campaign_id = raw.get("campaign_id")
    if isinstance(campaign_id, str) and campaign_id.isdigit():
        campaign_id = int(campaign_id)
    if not isinstance(campaign_id, int) or isinstance(campaign_id, bool):
        raise InvalidGrant(f"{key}: campaign_id must be an integer")
    for name in ("customer_id", "promo_code"):
        if not isinstance(raw.get(name), str) or not raw[name]:
            raise InvalidGrant(f"{key}: {name} must be a non-empty string")
    return Grant(key, campaign_id, raw["customer_id"], raw["promo_code"],
                 raw.get("channel_id"), raw.get("source"))


@dataclass
class Ledger:
    """Results per idempotency key and applications per triple. Not thread-safe: callers lock."""

    results: dict[str, dict] = field(default_factory=dict)
    applications: dict[tuple, int] = field(default_factory=dict)
    applied: int = 0
    rejected: int = 0
    calls: int = 0
    items_received: int = 0
    faults_injected: dict[str, int] = field(
        default_factory=lambda: {"failure": 0, "timeout": 0, "drop": 0, "item_retry": 0})
    _references: itertools.count = field(default_factory=lambda: itertools.count(1))

    def record(self, grant: Grant, reject_codes: frozenset) -> tuple[dict, bool]:
        """Apply or reject a grant once per key; return (stored result, is_new)."""
        known = self.results.get(grant.idempotency_key)
        if known is not None:
            return known, False
        if grant.promo_code in reject_codes:
            result = {"idempotency_key": grant.idempotency_key, "status": "rejected",
                      "reason": f"promo code {grant.promo_code} is not accepted"}
            self.rejected += 1
        else:
            result = {"idempotency_key": grant.idempotency_key, "status": "granted",
                      "reference": f"BON-{next(self._references):09d}"}
            self.applied += 1
            self.applications[grant.triple] = self.applications.get(grant.triple, 0) + 1
        self.results[grant.idempotency_key] = result
        return result, True

    def summary(self, full: bool = False) -> dict:
        """Counters for ``GET /_sim/ledger``; with ``full`` also every applied triple."""
        summary = {
            "applied": self.applied,
            "unique_triples": len(self.applications),
            "duplicate_grants": self.applied - len(self.applications),
            "calls": self.calls,
            "items_received": self.items_received,
            "rejected": self.rejected,
            "faults_injected": dict(self.faults_injected),
        }
        if full:
            summary["triples"] = [list(triple) for triple in self.applications]
        return summary
