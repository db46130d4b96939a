"""Bonus-system adapters: grant promo codes to customers in the operator's system.

Every grant carries an idempotency key derived from (campaign, customer, promo code), so a
retry after a crash is safe for a bonus system that honours it. Adapters answer one
`GrantResult` per item: `granted`, `rejected` (permanent, with a reason) or `retry`.
Built-ins: `http` (generic JSON over HTTP) and `fake` (in memory); others come from the
`relay.bonus_adapters` entry-point group. The HTTP and fake machinery lives in `shared.adapters.http`.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any, Protocol

from shared.adapters.http import FakeAdapter, HttpAdapter, ItemResult, load_adapter

ENTRY_POINT_GROUP = "relay.bonus_adapters"
STATUSES = ("granted", "rejected", "retry")

GrantResult = ItemResult


@dataclass(frozen=True)
class GrantItem:
    """One promo code to grant to one customer (`notification_id` set for real-time grants)."""

    idempotency_key: str
    campaign_id: int
    channel_id: int | None
    customer_id: str
    promo_code: str
    source: str
    notification_id: int | None = None

    def to_json(self) -> dict[str, Any]:
        """The item as the JSON object the bonus system receives (a flat `dataclasses.asdict`, much cheaper)."""
        return {"idempotency_key": self.idempotency_key, "campaign_id": self.campaign_id,
                "channel_id": self.channel_id, "customer_id": self.customer_id,
                "promo_code": self.promo_code, "source": self.source,
                "notification_id": self.notification_id}


REVOKE_STATUSES = ("revoked", "rejected", "retry")


@dataclass(frozen=True)
class RevokeItem:
    """One grant to take back (its campaign was cancelled); `reference` is the bonus system's grant reference."""

    idempotency_key: str
    campaign_id: int
    customer_id: str
    promo_code: str
    reference: str | None
    grant_id: int = 0  # ours, not sent

    def to_json(self) -> dict[str, Any]:
        """The item as the JSON object the bonus system receives."""
        return {"idempotency_key": self.idempotency_key, "campaign_id": self.campaign_id,
                "customer_id": self.customer_id, "promo_code": self.promo_code, "reference": self.reference}


class BonusAdapter(Protocol):
    """What the grant machinery needs from a bonus system."""

    def grant(self, items: list[GrantItem]) -> list[GrantResult]:
        """Grant `items`; one result per item, in order, with the same keys."""
        ...

    def close(self) -> None:
        """Release connections and threads."""
        ...


def idempotency_key(*parts: object) -> str:
    """A stable key for `parts`, e.g. (campaign, customer, promo code): `relay-` + 40 hex chars of a SHA-256."""
    raw = "\x1f".join(str(part) for part in parts)
    return "relay-" + hashlib.sha256(raw.encode("utf-8")).hexdigest()[:40]


class HttpBonusAdapter(HttpAdapter):
    """Generic JSON-over-HTTP bonus system, in `batch` (`{"grants": [...]}`) or `single` mode."""

    prefix = "bonus"
    envelope = "grants"
    success = "granted"
    statuses = STATUSES

    revoker: "HttpRevokeAdapter | None" = None

    @classmethod
    def from_settings(cls, settings):
        """The grant adapter of `BONUS_*`; with `BONUS_REVOKE_URL` it can also revoke."""
        adapter = super().from_settings(settings)
        if settings.bonus_revoke_url:
            adapter.revoker = HttpRevokeAdapter(settings.bonus_revoke_url, "batch", settings.bonus_batch_size,
                                                settings.bonus_concurrency, settings.bonus_timeout,
                                                settings.bonus_auth_header)
        return adapter

    @property
    def can_revoke(self) -> bool:
        """Whether `BONUS_REVOKE_URL` is set."""
        return self.revoker is not None

    def grant(self, items: list[GrantItem]) -> list[GrantResult]:
        """Grant `items`: batch mode posts chunks of `batch_size`, single mode one call per item."""
        return self.deliver(items)

    def revoke(self, items: list[RevokeItem]) -> list[ItemResult]:
        """Revoke `items`: `POST BONUS_REVOKE_URL {"revokes": [...]}` in chunks of `BONUS_BATCH_SIZE`."""
        if self.revoker is None:
            raise RuntimeError("BONUS_REVOKE_URL is not set")
        return self.revoker.deliver(items)

    def close(self) -> None:
        """Release the grant and revoke connections."""
        super().close()
        if self.revoker is not None:
            self.revoker.close()


class HttpRevokeAdapter(HttpAdapter):
    """The revoke endpoint: `{"revokes": [{"idempotency_key", "campaign_id", "customer_id", "promo_code",
    "reference"}]}` answered `{"results": [{"idempotency_key", "status": "revoked"|"rejected"|"retry"}]}`."""

    prefix = "bonus"
    envelope = "revokes"
    success = "revoked"
    statuses = REVOKE_STATUSES
    metrics_name = "revoke"


class FakeBonusAdapter(FakeAdapter):
    """An in-memory bonus system for tests (see `FakeAdapter`): `reject_code` refuses a promo code."""

    success = "granted"
    reject_by = "promo_code"

    @property
    def reject_codes(self) -> dict[str, str]:
        """Promo code → reason of every code refused."""
        return self.rejections

    def reject_code(self, promo_code: str, reason: str = "rejected by fake") -> None:
        """Reject every future grant of `promo_code` with `reason`."""
        self.reject(promo_code, reason)

    can_revoke = True

    def grant(self, items: list[GrantItem]) -> list[GrantResult]:
        """Apply each item once per idempotency key; repeats answer `granted` with the first reference."""
        return self.deliver(items)

    def revoke(self, items: list[RevokeItem]) -> list[ItemResult]:
        """Revoke each item once per key (`revoked` records them); a grant never applied is `rejected`."""
        with self._lock:
            if not hasattr(self, "revoked"):
                self.revoked: dict[str, RevokeItem] = {}
                self.revoke_calls: list[list[RevokeItem]] = []
            self.revoke_calls.append(list(items))
            applied = {(i.campaign_id, i.customer_id, i.promo_code) for i in self.applied.values()}
            out = []
            for item in items:
                if (item.campaign_id, item.customer_id, item.promo_code) not in applied:
                    out.append(ItemResult(item.idempotency_key, "rejected", reason="no such grant"))
                    continue
                self.revoked.setdefault(item.idempotency_key, item)
                out.append(ItemResult(item.idempotency_key, "revoked", f"revoke-{len(self.revoked)}"))
            return out


_BUILTINS = {"http": HttpBonusAdapter.from_settings, "fake": FakeBonusAdapter.from_settings}


def load_bonus_adapter(settings) -> BonusAdapter:
    """The adapter named by `settings.bonus_adapter`: a built-in or a `relay.bonus_adapters` entry point.

    An entry point is a class or factory taking `settings` (a class with `from_settings` is built by it).
    """
    return load_adapter(settings.bonus_adapter, _BUILTINS, ENTRY_POINT_GROUP, "BONUS_ADAPTER", settings)
