"""Fake bonus system: batch and single grant endpoints, idempotency keys, injectable faults.

``POST /bonus/grants`` takes ``{"grants": [...]}``, ``POST /bonus/grant`` one grant with an
``Idempotency-Key`` header; the HTTP and fault machinery lives in ``simulator.peer``. The
ledger key of a grant is (campaign_id, customer_id, promo_code, notification_id).

``POST /bonus/revokes`` takes ``{"revokes": [{"idempotency_key", "campaign_id", "customer_id",
"promo_code", "reference"?, "notification_id"?}]}`` and answers ``{"results": [{"idempotency_key",
"status": "revoked"|"rejected"|"retry", "reference"?, "reason"?}]}``; ``POST /bonus/revoke`` takes
one revoke with an ``Idempotency-Key`` header and answers 201, 409 (same key again), 422
(rejected) or 503. A revoke undoes the grant with the same ledger key (notification_id null by
default); one of a grant never applied, or whose ``reference`` differs, is rejected. The same
faults apply as to grants.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from simulator.ledger import InvalidItem, idempotency_key_of, int_field, text_field
from simulator.peer import FakePeer, PeerKind, RevokeKind, fault_config


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


@dataclass(slots=True)
class Revoke:
    """One revoke request: undo the grant of (campaign, customer, code, notification)."""

    idempotency_key: str
    campaign_id: int
    customer_id: str
    promo_code: str
    reference: str | None = None
    notification_id: int | None = None

    @property
    def target_key(self) -> tuple:
        """The ledger key of the grant it revokes."""
        return (self.campaign_id, self.customer_id, self.promo_code, self.notification_id)


def parse_revoke(raw: object, header_key: str | None = None) -> Revoke:
    """Build a Revoke from JSON; ``header_key`` (an Idempotency-Key header) takes precedence."""
    key = idempotency_key_of(raw, header_key, "revoke")
    reference = raw.get("reference")
    if reference is not None and not isinstance(reference, str):
        raise InvalidItem(f"{key}: reference must be a string or null")
    return Revoke(key, int_field(raw, "campaign_id", key), text_field(raw, "customer_id", key),
                  text_field(raw, "promo_code", key), reference or None,
                  int_field(raw, "notification_id", key, optional=True))


BonusConfig = fault_config("BonusConfig", "reject_codes", str)


def _rejected_code(grant: Grant, rejects: frozenset) -> str | None:
    return f"promo code {grant.promo_code} is not accepted" if grant.promo_code in rejects else None


def _triples(entries: list[dict]) -> dict:
    # the campaign driver and the fault tests compare these with the expected triples
    return {"triples": [entry["key"][:3] for entry in entries if entry["applications"]],
            "revoked_triples": [entry["key"][:3] for entry in entries if entry["revoked"]]}


BONUS = PeerKind(name="bonus system", path="/bonus", item="grant", applied_status="granted",
                 reference_prefix="BON", customer_index=1, config=BonusConfig, parse=parse_grant,
                 reject_reason=_rejected_code, full_extras=_triples,
                 summary_names={"unique_keys": "unique_triples", "duplicates": "duplicate_grants"},
                 revoke=RevokeKind(item="revoke", parse=parse_revoke))


def create_bonus_app(**settings) -> FakePeer:
    """Build a fake bonus system (settings: the BonusConfig fields); serve it with ``make_server``.

    Its ledger summary says ``applied``, ``unique_triples``, ``duplicate_grants``, ``calls``,
    ``items_received``, ``rejected``, ``faults_injected``, ``revoked``, ``double_revokes`` (must
    be 0), ``revokes_rejected``, ``revoke_calls``, ``revokes_received``; with ``full``, also
    ``entries`` (each with ``reference``, ``revoked``, ``revoked_at``, ``revocations``),
    ``triples`` (one per applied ledger key) and ``revoked_triples``.
    """
    return FakePeer.build(BONUS, **settings)
