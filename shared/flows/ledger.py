"""A ledger: rows claimed once, delivered in batches to a peer, each settled exactly once.

`grants.py` (the bonus system) and `sends.py` (the send service) are the two ledgers; this
module is everything they share. A row is claimed with `INSERT … ON CONFLICT DO NOTHING
RETURNING` (in the transaction that advances a run's cursor, or that finishes a real-time
notification), stores its idempotency key, and moves `claimed -> <done> | rejected | failed`
exactly once, whatever replays its batch.
"""
from __future__ import annotations

import dataclasses
import logging
import time
from hashlib import sha256
from dataclasses import dataclass
from typing import Any, Iterable

from shared import dispatch, metrics, repository as repo
from shared.db import unit_of_work
from shared.dispatch import Enqueue
from shared.flows import runs
from shared.optimove.client import backoff

log = logging.getLogger(__name__)

SEPARATOR = "\x1f"  # between the parts of an idempotency key (`shared.adapters.bonus.idempotency_key`)


@dataclass(frozen=True)
class Scope:
    """What the claimed rows belong to: a campaign (and channel, run), or one real-time notification.

    With `per_notification` the rows are unique per notification instead of per campaign, and the
    notification is part of their idempotency key.
    """

    campaign_id: int
    channel_id: int | None
    source: str
    run_id: int | None = None
    notification_id: int | None = None
    per_notification: bool = False

    @property
    def unique_to(self) -> int:
        """The `scope` column: 0 for the campaign, else the notification id."""
        return self.notification_id if self.per_notification else 0

    def keys(self, rows: Iterable[tuple[str, ...]]) -> list[str]:
        """The idempotency key of each row of this scope, given its parts as strings: the same as
        `idempotency_key(campaign, *parts[, "notification:N"])`, inlined for a page's thousands of rows."""
        head = f"{self.campaign_id}\x1f"
        tail = f"\x1fnotification:{self.notification_id}" if self.per_notification else ""
        return ["relay-" + sha256(f"{head}{SEPARATOR.join(row)}{tail}".encode()).hexdigest()[:40] for row in rows]

    def fixed(self) -> dict[str, Any]:
        """The columns every row of this scope shares."""
        return {"campaign_id": self.campaign_id, "channel_id": self.channel_id, "run_id": self.run_id,
                "source": self.source, "scope": self.unique_to, "notification_id": self.notification_id}


class Ledger:
    """The shared machinery; a subclass says how claims become columns and rows become peer items."""

    table: repo.LedgerTable
    task: str
    noun: str
    settings_prefix: str  # `bonus` reads BONUS_BATCH_SIZE and BONUS_MAX_ATTEMPTS

    # -- what a subclass provides ----------------------------------------------------------

    def columns(self, scope: Scope, claims: list) -> dict[str, tuple[str, list]]:
        """The varying columns (Postgres type, values) of `claims`, sorted by the unique key."""
        raise NotImplementedError

    def item(self, row: repo.ClaimedRow) -> Any:
        """The adapter item for a claimed row."""
        raise NotImplementedError

    def call(self, rt, items: list) -> list:
        """Hand `items` to the peer's adapter; one result per item."""
        raise NotImplementedError

    def settled(self, rt, conn, run_id: int | None, claimed: list[repo.ClaimedRow]) -> list[Enqueue]:
        """Work that follows a settled batch (inside its transaction); none by default."""
        return []

    # -- the machinery ---------------------------------------------------------------------

    def batch_size(self, settings) -> int:
        """Rows per delivery task (`<PREFIX>_BATCH_SIZE`)."""
        return getattr(settings, f"{self.settings_prefix}_batch_size")

    def max_attempts(self, settings) -> int:
        """Attempts per row before it is parked as `failed` (`<PREFIX>_MAX_ATTEMPTS`)."""
        return getattr(settings, f"{self.settings_prefix}_max_attempts")

    def claim(self, conn, scope: Scope, claims: list, rows: bool = False) -> repo.Claimed:
        """Claim `claims` in `scope` (inside the caller's transaction); return the ids this call won that are
        due now, or with `rows` the rows, for a delivery right after the commit without reading them back.
        `.waiting` of the result counts the rows won that wait for their due time (`release_due`)."""
        if not claims:
            return repo.Claimed()
        won = repo.claim(conn, self.table, scope.fixed(), self.columns(scope, claims), rows=rows)
        metrics.claimed(conn, self.table.name, scope.source, len(won) + won.waiting, len(claims))
        return won

    def deliveries(self, rows: Iterable[tuple[int | None, int, str]], settings) -> list[Enqueue]:
        """Delivery tasks for (run id, row id, source) triples, on the queue each source belongs to."""
        return dispatch.deliveries(self.task, rows, self.batch_size(settings))

    def deliver(self, rt, run_id: int | None, ids: list[int]) -> list[Enqueue]:
        """Send the still-claimed rows among `ids` to the peer and record each result."""
        with unit_of_work(rt.engine) as conn:
            claimed = repo.claimed_rows(conn, self.table, ids)
            if claimed and run_id is not None:
                claimed = runs.before_delivery(rt, conn, self.table, run_id, claimed)
            if not claimed:
                return runs.finish(rt, conn, run_id) if run_id is not None else []
        return self.deliver_claimed(rt, run_id, claimed)

    def deliver_claimed(self, rt, run_id: int | None, claimed: list[repo.ClaimedRow]) -> list[Enqueue]:
        """Send rows this caller holds `claimed` (read or just claimed) to the peer and record each result."""
        rows = {row.idempotency_key: row for row in claimed}
        try:
            results = self.call(rt, [self.item(row) for row in rows.values()])
            by_key = {r.idempotency_key: r for r in results}
        except Exception as exc:  # an adapter bug or outage must not lose the batch
            log.exception("%s adapter raised; batch of %d will be retried", self.noun, len(rows))
            by_key, reason = {}, f"adapter error: {type(exc).__name__}: {exc}"
        else:
            reason = f"no result from the {self.noun} adapter"
        done, rejected, retry = [], [], []
        for key, row in rows.items():
            r = by_key.get(key)
            if r is not None and r.status == self.table.done:
                done.append((row.id, r.reference))
            elif r is not None and r.status == "rejected":
                rejected.append((row.id, r.reason or f"rejected by the {self.noun} service"))
            else:
                retry.append((row.id, (r.reason if r is not None and r.reason else reason)))
        with unit_of_work(rt.engine) as conn:
            settled = repo.settle(conn, self.table, run_id, done=done, rejected=rejected, retry=retry,
                                  max_attempts=self.max_attempts(rt.settings))
            finished = self.settled(rt, conn, run_id, claimed)
            finished += runs.after_settle(rt, conn, run_id, claimed) if run_id is not None else []
            if run_id is not None and not settled.retry_ids:
                finished += runs.finish(rt, conn, run_id)
        # one batch is one run's rows (or one real-time source's): `dispatch.deliveries` groups them so
        metrics.ledger_settled(self.table.name, claimed[0].source, done=settled.done, rejected=settled.rejected,
                               failed=settled.failed, retry=len(settled.retry_ids))
        log.info("%ss of run %s: %d %s, %d rejected, %d failed, %d to retry", self.noun, run_id, settled.done,
                 self.table.done, settled.rejected, settled.failed, len(settled.retry_ids))
        if not settled.retry_ids:
            return finished
        # equal jitter: the default 8 attempts span at least 60 s, so a peer down for a minute loses nothing
        wait = backoff(1 + max(row.attempts for row in claimed), cap=30, floor=0.5)
        source = {row.id: row.source for row in claimed}
        return finished + [dataclasses.replace(item, countdown=wait) for item in
                           self.deliveries(((run_id, i, source[i]) for i in settled.retry_ids), rt.settings)]

    def stale(self, rt, conn) -> list[Enqueue]:
        """Deliveries for claimed rows nobody touched for `RELAY_SWEEP_AFTER` (their task was lost)."""
        return self.deliveries(repo.claim_stale(conn, self.table, rt.settings.sweep_after_seconds), rt.settings)

    def release_due(self, rt, batch: int = 10_000, budget_s: float = 1.0) -> list[Enqueue]:
        """Deliveries for this ledger's waiting rows whose due time has come: `batch` rows per transaction,
        more transactions while rows keep coming, for up to `budget_s` (a campaign's sends may all fall
        due at the same minute)."""
        rows: list[tuple[int | None, int, str]] = []
        started = time.monotonic()
        while True:
            with unit_of_work(rt.engine) as conn:
                released = repo.release_due(conn, self.table, limit=batch)
            rows += released
            if len(released) < batch or time.monotonic() - started > budget_s:
                break
        if rows:
            log.info("%d %s(s) due: released", len(rows), self.noun)
        return self.deliveries(rows, rt.settings)

    def redrive(self, rt, conn, campaign_id: int) -> tuple[int, list[Enqueue]]:
        """Put a campaign's failed rows back to `claimed`; return (how many, their deliveries)."""
        rows = repo.redrive_failed(conn, self.table, campaign_id)
        return len(rows), self.deliveries(rows, rt.settings)
