"""Idempotency keys of ledger rows: the claim's inlined form equals the adapters' `idempotency_key`."""
from __future__ import annotations

from shared.adapters.bonus import idempotency_key
from shared.flows.ledger import Scope


def test_campaign_keys_are_the_keys_grants_always_had():
    scope = Scope(175777, 504, "scheduled_bonus", run_id=3)
    assert scope.keys([("C000123", "WB23")]) == ["relay-2772ac5ba142ab5f469f9dfd40f204357a3bd5e6"]
    assert scope.keys([("C1", "A"), ("C2", "B")]) == [idempotency_key(175777, "C1", "A"),
                                                      idempotency_key(175777, "C2", "B")]
    assert scope.unique_to == 0 and scope.fixed()["scope"] == 0


def test_per_notification_keys_include_the_notification():
    scope = Scope(9001, 600, "realtime", notification_id=42, per_notification=True)
    assert scope.keys([("c-1", "A1")]) == [idempotency_key(9001, "c-1", "A1", "notification:42")]
    assert scope.unique_to == 42
    shared = Scope(9001, 600, "realtime", notification_id=42, per_notification=False)
    assert shared.keys([("c-1", "A1")]) == [idempotency_key(9001, "c-1", "A1")] and shared.unique_to == 0
    assert shared.fixed()["notification_id"] == 42
