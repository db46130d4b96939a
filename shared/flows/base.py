"""What every flow is made of: a `Flow` (how it starts, and how it pages if it does) and an `Outcome`."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable

from shared.dispatch import Enqueue

if TYPE_CHECKING:
    from shared.flows.ledger import Ledger


@dataclass
class Outcome:
    """What a flow made of a notification: final status, a reason, work to enqueue after commit,
    and ledger rows to deliver at once after commit (real-time flows, no queue hop)."""

    status: str
    reason: str | None = None
    follow_ups: list[Enqueue] = field(default_factory=list)
    deliver_now: list[tuple["Ledger", list]] = field(default_factory=list)  # (ledger, claimed rows)


@dataclass(frozen=True)
class Pages:
    """How a paged flow pages: which Optimove function with which parameters, and what a page claims.

    `params(run, settings)` are the call's query parameters besides paging; `claims(rows, run,
    settings)` turns a page of API rows into the ledger's claim list (see `Ledger.claim`);
    `source` is the value recorded on each claimed row and sent to the peer.
    """

    category: str
    function: str
    params: Callable[[dict, Any], dict]
    ledger: "Ledger"
    source: str
    claims: Callable[[list[Any], dict, Any], list]


@dataclass(frozen=True)
class Flow:
    """One of the relay's flows: its name (stored on runs), what it is, how it starts, and its pages."""

    name: str
    title: str
    start: Callable[[Any, Any, dict], Outcome]
    pages: Pages | None = None
