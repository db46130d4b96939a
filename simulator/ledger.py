"""Ledger of a fake peer (bonus system, send service).

Each idempotency key is applied at most once. Applications, rejections and the time the
first call carrying it arrived are kept per *ledger key* (what the effect is about, e.g.
campaign, customer, code and notification for a grant); an application is a duplicate only
when one ledger key is applied under two different idempotency keys.

A ledger with ``timed`` also checks due times: items may carry ``due_at`` (epoch seconds, None
for "now"); every item received before its due time counts as ``early``, and each ledger key's
first receive minus its due time (0 when early) feeds the ``late_seconds`` percentiles.

A ``revocable`` ledger also takes revokes (the bonus system's): a revoke names the ledger key
of an applied item (``target_key``) and is applied at most once per idempotency key, like an
item. Revoking a key that was never applied is rejected; revoking an already revoked key under
another idempotency key answers ``revoked`` again but counts as a ``double_revokes``.
"""

from __future__ import annotations

import gc
import itertools
import math
import time
from dataclasses import dataclass, field
from typing import Any, Iterator


class InvalidItem(ValueError):
    """An item (a grant or a send) is missing a field or has the wrong type; the message names it."""


def idempotency_key_of(raw: object, header_key: str | None, what: str) -> str:
    """The item's idempotency key; an ``Idempotency-Key`` header takes precedence over the body's."""
    if not isinstance(raw, dict):
        raise InvalidItem(f"a {what} must be a JSON object")
    body_key = raw.get("idempotency_key")
    if header_key and body_key and header_key != body_key:
        raise InvalidItem("Idempotency-Key header does not match the body's idempotency_key")
    key = header_key or body_key
    if not isinstance(key, str) or not key:
        raise InvalidItem("idempotency_key is required")
    return key


def int_field(raw: dict, name: str, key: str, optional: bool = False) -> int | None:
    """``raw[name]`` as an integer (a numeric string is accepted); None only when ``optional``."""
    value = raw.get(name)
    if value is None and optional:
        return None
    if isinstance(value, str) and value.isdigit():
        value = int(value)
    if not isinstance(value, int) or isinstance(value, bool):
        raise InvalidItem(f"{key}: {name} must be an integer{' or null' if optional else ''}")
    return value


def text_field(raw: dict, name: str, key: str) -> str:
    """``raw[name]`` as a non-empty string."""
    value = raw.get(name)
    if not isinstance(value, str) or not value:
        raise InvalidItem(f"{key}: {name} must be a non-empty string")
    return value


@dataclass(slots=True)
class Entry:
    """What the ledger knows about one ledger key."""

    idempotency_key: str
    first_received_at: float
    source: Any
    applications: int = 0
    rejections: int = 0
    applied_at: float | None = None
    due_at: float | None = None
    early: int = 0
    detail: Any = None
    reference: str | None = None
    revoked_at: float | None = None
    revocations: int = 0

    def to_json(self, key: tuple, revocable: bool = False) -> dict:
        """The entry as listed by ``GET /_sim/ledger?full=1``; ``due_at`` and ``early`` only for
        items with a due time, ``detail`` (a send's attributes) only when the item has one, and in
        a revocable ledger ``reference`` (of the first application), ``revoked``, ``revoked_at``
        (when the first revoke arrived) and ``revocations`` (revokes applied, 1 at most when right)."""
        entry = {"key": list(key), "idempotency_key": self.idempotency_key,
                 "first_received_at": self.first_received_at, "applied_at": self.applied_at,
                 "applications": self.applications, "rejections": self.rejections, "source": self.source}
        if self.due_at is not None:
            entry["due_at"] = self.due_at
            entry["early"] = self.early
        if self.detail is not None:
            entry["detail"] = self.detail
        if revocable:
            entry.update(reference=self.reference, revoked=self.revoked_at is not None,
                         revoked_at=self.revoked_at, revocations=self.revocations)
        return entry


def percentiles(values: list[float]) -> dict:
    """p50, p99 and max of sorted ``values`` (nearest rank, rounded to the millisecond) and their count."""
    if not values:
        return {"p50": None, "p99": None, "max": None, "count": 0}

    def rank(p: float) -> float:
        return round(values[max(0, math.ceil(p / 100 * len(values)) - 1)], 3)

    return {"p50": rank(50), "p99": rank(99), "max": round(values[-1], 3), "count": len(values)}


FREEZE_EVERY = 50_000
_frozen_at = 0


def _freeze_when_grown(size: int) -> None:
    """Keep the ledger's entries out of Python's full garbage collections.

    A fake peer holding two campaigns' entries (about 2 million objects) otherwise pauses for a full
    collection of ~0.7 s every time its object count grows by a quarter, and every call arriving
    meanwhile is stamped late: the pause would count as the relay's latency. `gc.freeze()` moves
    what exists to a generation the collector skips; entries are never freed before a reset anyway.
    """
    global _frozen_at
    if size - _frozen_at >= FREEZE_EVERY or size < _frozen_at:
        gc.freeze()
        _frozen_at = size


@dataclass
class Ledger:
    """Results per idempotency key and an Entry per ledger key. Not thread-safe: callers lock.

    Items need ``idempotency_key``, ``ledger_key`` (a tuple whose first element is the
    campaign id) and ``source``; they may have ``due_at`` and ``detail``.
    """

    reference_prefix: str = "BON"
    applied_status: str = "granted"
    timed: bool = False
    revocable: bool = False
    results: dict[str, dict] = field(default_factory=dict)
    entries: dict[tuple, Entry] = field(default_factory=dict)
    applied: int = 0
    unique_keys: int = 0
    rejected: int = 0
    calls: int = 0
    items_received: int = 0
    faults_injected: dict[str, int] = field(
        default_factory=lambda: {"failure": 0, "timeout": 0, "drop": 0, "item_retry": 0})
    early: int = 0
    _lateness: list[float] = field(default_factory=list)  # not yet merged into _lateness_sorted
    _lateness_sorted: list[float] = field(default_factory=list)
    _references: itertools.count = field(default_factory=lambda: itertools.count(1))
    revoke_results: dict[str, dict] = field(default_factory=dict)
    revoked: int = 0
    double_revokes: int = 0
    revokes_rejected: int = 0
    revoke_calls: int = 0
    revokes_received: int = 0
    _revoke_references: itertools.count = field(default_factory=lambda: itertools.count(1))

    def _new_entry(self, item, now: float) -> Entry:
        due_at = getattr(item, "due_at", None)
        entry = self.entries[item.ledger_key] = Entry(item.idempotency_key, now, item.source, due_at=due_at,
                                                      detail=getattr(item, "detail", None))
        if due_at is not None:
            self._lateness.append(max(0.0, now - due_at))
        return entry

    def _note_early(self, item, entry: Entry, now: float) -> None:
        due_at = getattr(item, "due_at", None)
        if due_at is not None and now < due_at:
            self.early += 1
            entry.early += 1

    def receive(self, items: list, now: float) -> None:
        """Count a call and note ``now`` as the first receive time of every new ledger key in it,
        and as an early arrival of every item due later."""
        self.calls += 1
        self.items_received += len(items)
        entries = self.entries
        for item in items:
            entry = entries.get(item.ledger_key)
            if entry is None:
                entry = self._new_entry(item, now)
            self._note_early(item, entry, now)
        _freeze_when_grown(len(entries))

    def record(self, item, reject_reason: str | None, received_at: float | None = None) -> tuple[dict, bool]:
        """Apply or reject an item once per idempotency key; return (stored result, is_new).

        ``received_at`` is when the call carrying it arrived; the first application keeps it as
        ``applied_at`` (after failed calls, ``first_received_at`` is earlier).
        """
        known = self.results.get(item.idempotency_key)
        if known is not None:
            return known, False
        received_at = time.time() if received_at is None else received_at
        entry = self.entries.get(item.ledger_key)
        if entry is None:  # applied without ``receive`` (direct use): note its arrival here
            entry = self._new_entry(item, received_at)
            self._note_early(item, entry, received_at)
        if reject_reason:
            result = {"idempotency_key": item.idempotency_key, "status": "rejected", "reason": reject_reason}
            self.rejected += 1
            entry.rejections += 1
        else:
            result = {"idempotency_key": item.idempotency_key, "status": self.applied_status,
                      "reference": f"{self.reference_prefix}-{next(self._references):09d}"}
            self.applied += 1
            if entry.applications == 0:
                self.unique_keys += 1
                entry.applied_at = received_at
                entry.reference = result["reference"]
            entry.applications += 1
        self.results[item.idempotency_key] = result
        return result, True

    def receive_revokes(self, items: list, now: float) -> None:
        """Count a revoke call (revokes do not create entries)."""
        self.revoke_calls += 1
        self.revokes_received += len(items)

    def revoke(self, item, received_at: float | None = None) -> tuple[dict, bool]:
        """Revoke the applied item ``item.target_key`` once per idempotency key; return (stored result,
        is_new). Rejected when nothing was applied under that key, or when ``item.reference`` is given
        and is not the reference of the first application."""
        known = self.revoke_results.get(item.idempotency_key)
        if known is not None:
            return known, False
        received_at = time.time() if received_at is None else received_at
        entry = self.entries.get(item.target_key)
        reason = None
        if entry is None or not entry.applications:
            reason = f"no {self.applied_status} item {list(item.target_key)} to revoke"
        elif item.reference and item.reference != entry.reference:
            reason = f"reference {item.reference} is not the reference {entry.reference} of {list(item.target_key)}"
        if reason:
            result = {"idempotency_key": item.idempotency_key, "status": "rejected", "reason": reason}
            self.revokes_rejected += 1
        else:
            result = {"idempotency_key": item.idempotency_key, "status": "revoked",
                      "reference": f"REV-{next(self._revoke_references):09d}"}
            if entry.revoked_at is None:
                entry.revoked_at = received_at
                self.revoked += 1
            else:
                self.double_revokes += 1
                result["reason"] = "already revoked"
            entry.revocations += 1
        self.revoke_results[item.idempotency_key] = result
        return result, True

    def counters(self) -> dict:
        """Totals over the whole ledger; ``duplicates`` = applications beyond one per ledger key.

        A ``timed`` ledger adds ``timed_keys`` (ledger keys with a due time), ``early`` and
        ``late_seconds`` ({p50, p99, max, count}); a ``revocable`` one ``revoked`` (ledger keys
        revoked), ``double_revokes`` (revokes of an already revoked key under a new idempotency
        key), ``revokes_rejected``, ``revoke_calls`` and ``revokes_received``.
        """
        counters = {"applied": self.applied, "unique_keys": self.unique_keys,
                    "duplicates": self.applied - self.unique_keys, "calls": self.calls,
                    "items_received": self.items_received, "rejected": self.rejected,
                    "faults_injected": dict(self.faults_injected)}
        if self.timed:
            if self._lateness:  # two sorted runs: Timsort merges them in linear time
                self._lateness_sorted = sorted(self._lateness_sorted + sorted(self._lateness))
                self._lateness = []
            counters.update(timed_keys=len(self._lateness_sorted), early=self.early,
                            late_seconds=percentiles(self._lateness_sorted))
        if self.revocable:
            counters.update(revoked=self.revoked, double_revokes=self.double_revokes,
                            revokes_rejected=self.revokes_rejected, revoke_calls=self.revoke_calls,
                            revokes_received=self.revokes_received)
        return counters

    def select(self, campaign_id: int | None = None, customer_prefix: str | None = None,
               customer_index: int = 1) -> Iterator[tuple[tuple, Entry]]:
        """(ledger key, entry) pairs, optionally only one campaign's and customers with a prefix."""
        for key, entry in self.entries.items():
            if campaign_id is not None and key[0] != campaign_id:
                continue
            if customer_prefix and not str(key[customer_index]).startswith(customer_prefix):
                continue
            yield key, entry
