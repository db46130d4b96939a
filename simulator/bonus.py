"""Fake bonus system: batch and single grant endpoints, idempotency keys, injectable faults.

``POST /bonus/grants`` takes ``{"grants": [...]}``, ``POST /bonus/grant`` one grant with an
``Idempotency-Key`` header; the HTTP and fault machinery lives in ``simulator.peer``. The
ledger key of a grant is (campaign_id, customer_id, promo_code, notification_id).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from simulator.ledger import idempotency_key_of, int_field, text_field
from simulator.peer import FakePeer, PeerKind, fault_config


@dataclass(slots=True)
class Grant:
    """One grant request as the bonus system receives it."""

    idempotency_key: str
    campaign_id: int
    customer_id: str
    promo_code: str
    channel_id: Any = None
    source: Any = None
    notification_id: int | None = None

    @property
    def ledger_key(self) -> tuple:
        """What the grant is about: (campaign, customer, code, notification; None for campaign grants)."""
        return (self.campaign_id, self.customer_id, self.promo_code, self.notification_id)


def parse_grant(raw: object, header_key: str | None = None) -> Grant:
    """Build a Grant from JSON; ``header_key`` (an Idempotency-Key header) takes precedence."""
    key = idempotency_key_of(raw, header_key, "grant")
    return Grant(key, int_field(raw, "campaign_id", key), text_field(raw, "customer_id", key),
                 text_field(raw, "promo_code", key), raw.get("channel_id"), raw.get("source"),
                 int_field(raw, "notification_id", key, optional=True))


BonusConfig = fault_config("BonusConfig", "reject_codes", str)


def _rejected_code(grant: Grant, rejects: frozenset) -> str | None:
    return f"promo code {grant.promo_code} is not accepted" if grant.promo_code in rejects else None


def _triples(entries: list[dict]) -> dict:
    # the campaign driver and the fault tests compare these with the expected triples
    return {"triples": [entry["key"][:3] for entry in entries if entry["applications"]]}


BONUS = PeerKind(name="bonus system", path="/bonus", item="grant", applied_status="granted",
                 reference_prefix="BON", customer_index=1, config=BonusConfig, parse=parse_grant,
                 reject_reason=_rejected_code, full_extras=_triples,
                 summary_names={"unique_keys": "unique_triples", "duplicates": "duplicate_grants"})


def create_bonus_app(**settings) -> FakePeer:
    """Build a fake bonus system (settings: the BonusConfig fields); serve it with ``make_server``.

    Its ledger summary says ``applied``, ``unique_triples``, ``duplicate_grants``, ``calls``,
    ``items_received``, ``rejected``, ``faults_injected``; with ``full``, also ``entries`` and
    ``triples`` (one per applied ledger key).
    """
    return FakePeer.build(BONUS, **settings)
