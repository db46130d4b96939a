"""Ledger of a fake peer (bonus system, send service).

Each idempotency key is applied at most once. Applications, rejections and the time the
first call carrying it arrived are kept per *ledger key* (what the effect is about, e.g.
campaign, customer, code and notification for a grant); an application is a duplicate only
when one ledger key is applied under two different idempotency keys.
"""

from __future__ import annotations

import itertools
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

    def to_json(self, key: tuple) -> dict:
        """The entry as listed by ``GET /_sim/ledger?full=1``."""
        return {"key": list(key), "idempotency_key": self.idempotency_key,
                "first_received_at": self.first_received_at, "applied_at": self.applied_at,
                "applications": self.applications, "rejections": self.rejections, "source": self.source}


@dataclass
class Ledger:
    """Results per idempotency key and an Entry per ledger key. Not thread-safe: callers lock.

    Items need ``idempotency_key``, ``ledger_key`` (a tuple whose first element is the
    campaign id) and ``source``.
    """

    reference_prefix: str = "BON"
    applied_status: str = "granted"
    results: dict[str, dict] = field(default_factory=dict)
    entries: dict[tuple, Entry] = field(default_factory=dict)
    applied: int = 0
    unique_keys: int = 0
    rejected: int = 0
    calls: int = 0
    items_received: int = 0
    faults_injected: dict[str, int] = field(
        default_factory=lambda: {"failure": 0, "timeout": 0, "drop": 0, "item_retry": 0})
    _references: itertools.count = field(default_factory=lambda: itertools.count(1))

    def receive(self, items: list, now: float) -> None:
        """Count a call and note ``now`` as the first receive time of every new ledger key in it."""
        self.calls += 1
        self.items_received += len(items)
        entries = self.entries
        for item in items:
            if item.ledger_key not in entries:
                entries[item.ledger_key] = Entry(item.idempotency_key, now, item.source)

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
        if entry is None:
            entry = self.entries[item.ledger_key] = Entry(item.idempotency_key, received_at, item.source)
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
            entry.applications += 1
        self.results[item.idempotency_key] = result
        return result, True

    def counters(self) -> dict:
        """Totals over the whole ledger; ``duplicates`` = applications beyond one per ledger key."""
        return {"applied": self.applied, "unique_keys": self.unique_keys,
                "duplicates": self.applied - self.unique_keys, "calls": self.calls,
                "items_received": self.items_received, "rejected": self.rejected,
                "faults_injected": dict(self.faults_injected)}

    def select(self, campaign_id: int | None = None, customer_prefix: str | None = None,
               customer_index: int = 1) -> Iterator[tuple[tuple, Entry]]:
        """(ledger key, entry) pairs, optionally only one campaign's and customers with a prefix."""
        for key, entry in self.entries.items():
            if campaign_id is not None and key[0] != campaign_id:
                continue
            if customer_prefix and not str(key[customer_index]).startswith(customer_prefix):
                continue
            yield key, entry
