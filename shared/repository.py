"""All SQL of the relay. Functions take an open connection; the caller owns the transaction."""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Any, Iterable, Sequence

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from shared.schemas import Notification


def _raw(conn: Connection):
    """The psycopg2 cursor of `conn` (same transaction), for bulk statements."""
    return conn.connection.driver_connection.cursor()


def _rows(result) -> list[dict[str, Any]]:
    return [dict(r._mapping) for r in result]


# -- notifications -------------------------------------------------------------------------

def insert_notification(conn, n: Notification, raw_body: str, payload: str | None = None) -> tuple[int, bool]:
    """Store a notification (its body as received, and as jsonb: `payload`, default the body) once per
    dedupe key; return (id, created).

    `conn` is a SQLAlchemy connection or a psycopg2 one (the listener's `KeptConnections`).
    """
    cur = conn.cursor() if hasattr(conn, "cursor") else _raw(conn)
    cur.execute("""
        INSERT INTO notifications (event_type, campaign_id, channel_id, dedupe_key, payload, raw_body)
        VALUES (%s, %s, %s, %s, CAST(%s AS jsonb), %s)
        ON CONFLICT (dedupe_key) DO NOTHING
        RETURNING id""", (n.event_type, n.campaign_id, n.channel_id, n.dedupe_key,
                          raw_body if payload is None else payload, raw_body))
    row = cur.fetchone()
    if row:
        return row[0], True
    cur.execute("SELECT id FROM notifications WHERE dedupe_key = %s", (n.dedupe_key,))
    return cur.fetchone()[0], False


def start_notification(conn: Connection, notification_id: int) -> dict[str, Any] | None:
    """Mark an unfinished notification `processing`, count the attempt, and return it (None if finished)."""
    row = conn.execute(sa.text("""
        UPDATE notifications SET status = 'processing', attempts = attempts + 1, updated_at = now()
        WHERE id = :id AND status IN ('received', 'processing')
        RETURNING id, event_type, campaign_id, channel_id, payload, attempts"""),
        {"id": notification_id}).first()
    return dict(row._mapping) if row else None


def lock_unfinished_notification(conn: Connection, notification_id: int) -> dict[str, Any] | None:
    """The notification, row-locked for this transaction, while it is unfinished (None once finished)."""
    row = conn.execute(sa.text("""
        SELECT id, event_type, campaign_id, channel_id, payload, attempts, last_error FROM notifications
        WHERE id = :id AND status IN ('received', 'processing') FOR UPDATE"""), {"id": notification_id}).first()
    return dict(row._mapping) if row else None


def finish_notification(conn: Connection, notification_id: int, status: str, error: str | None = None) -> None:
    """Record the outcome (`done`, `ignored`, `failed`) of a notification."""
    conn.execute(sa.text("""
        UPDATE notifications SET status = :status, last_error = :error, updated_at = now(), processed_at = now()
        WHERE id = :id"""), {"id": notification_id, "status": status, "error": error})


def note_notification_error(conn: Connection, notification_id: int, error: str) -> None:
    """Keep the last error of a notification that will be tried again."""
    conn.execute(sa.text("UPDATE notifications SET last_error = :e, updated_at = now() WHERE id = :id"),
                 {"id": notification_id, "e": error[:2000]})


def get_notification(conn: Connection, notification_id: int) -> dict[str, Any] | None:
    """One notification row."""
    row = conn.execute(sa.text("SELECT * FROM notifications WHERE id = :id"), {"id": notification_id}).first()
    return dict(row._mapping) if row else None


def claim_stale_notifications(conn: Connection, older_than_s: float, limit: int = 1000) -> list[dict[str, Any]]:
    """Unfinished notifications untouched for `older_than_s`; their clock is reset so one sweep takes each."""
    return _rows(conn.execute(sa.text("""
        UPDATE notifications SET updated_at = now()
        WHERE id IN (SELECT id FROM notifications
                     WHERE status IN ('received', 'processing')
                       AND updated_at < now() - make_interval(secs => :age)
                     ORDER BY id LIMIT :limit FOR UPDATE SKIP LOCKED)
        RETURNING id, event_type"""), {"age": older_than_s, "limit": limit}))


def count_notifications(conn: Connection) -> int:
    """Number of rows in the inbox."""
    return conn.execute(sa.text("SELECT count(*) FROM notifications")).scalar_one()


# -- scrape-time gauges (`/metrics`): each reads an index's worth of rows at most, never a whole table ------

def unfinished_notification_counts(conn: Connection, cap: int) -> list[tuple[int, str, int]]:
    """(event_type, status, count) of the notifications not finished yet (`received`, `processing`), read through
    the partial index `notifications_unfinished`, at most `cap` rows in all."""
    return [tuple(r) for r in conn.execute(sa.text("""
        SELECT event_type, status, count(*) FROM (
            SELECT event_type, status FROM notifications WHERE status IN ('received', 'processing') LIMIT :cap) u
        GROUP BY 1, 2 ORDER BY 1, 2"""), {"cap": cap})]


def running_run_counts(conn: Connection, cap: int) -> list[tuple[str, int]]:
    """(flow, count) of running runs, read through the partial index `campaign_runs_unfinished`, at most `cap`."""
    return [tuple(r) for r in conn.execute(sa.text("""
        SELECT flow, count(*) FROM (SELECT flow FROM campaign_runs WHERE status = 'running' LIMIT :cap) r
        GROUP BY 1 ORDER BY 1"""), {"cap": cap})]


def recently_ended_run_counts(conn: Connection, window: int, seconds: float) -> list[tuple[str, str, int]]:
    """(flow, status, count) of the runs among the newest `window` (by primary key) that ended in the last
    `seconds` seconds."""
    return [tuple(r) for r in conn.execute(sa.text("""
        SELECT flow, status, count(*) FROM campaign_runs
        WHERE id > (SELECT coalesce(max(id), 0) FROM campaign_runs) - :window
          AND status <> 'running' AND finished_at > now() - make_interval(secs => :secs)
        GROUP BY 1, 2 ORDER BY 1, 2"""), {"window": window, "secs": seconds})]


def estimated_rows(conn: Connection, tables: Sequence[str]) -> dict[str, int]:
    """Live rows of each of `tables` as Postgres' statistics estimate them (`n_live_tup`, else `reltuples` of
    the last ANALYZE); no table is read."""
    return {name: int(n) for name, n in conn.execute(sa.text("""
        SELECT t.name, CASE WHEN pg_stat_get_live_tuples(c.oid) > 0 THEN pg_stat_get_live_tuples(c.oid)
                            ELSE greatest(c.reltuples, 0)::bigint END
        FROM unnest(CAST(:names AS text[])) AS t(name) JOIN pg_class c ON c.oid = to_regclass(t.name)"""),
        {"names": list(tables)})}


# -- campaign runs -------------------------------------------------------------------------

RUN_COLUMNS = ("id, notification_id, flow, campaign_id, channel_id, status, cursor, fetch_done, pages_fetched, "
               "fetched, claimed, duplicates_skipped, granted, sent, rejected, failed, attempts, last_error, "
               "created_at, updated_at, finished_at, metrics_reported_at, metrics_error, deadline, "
               "reported_true, reported_false, expired, revoked, cancelled")


def create_run(conn: Connection, notification_id: int, flow: str, campaign_id: int,
               channel_id: int | None, deadline: Any = None) -> tuple[int, bool]:
    """One run per (notification, flow); return (run id, created). `deadline` bounds a conditional run."""
    row = conn.execute(sa.text("""
        INSERT INTO campaign_runs (notification_id, flow, campaign_id, channel_id, deadline)
        VALUES (:n, :flow, :campaign, :channel, :deadline)
        ON CONFLICT (notification_id, flow) DO NOTHING RETURNING id"""),
        {"n": notification_id, "flow": flow, "campaign": campaign_id, "channel": channel_id,
         "deadline": deadline}).first()
    if row:
        return row.id, True
    return conn.execute(sa.text("SELECT id FROM campaign_runs WHERE notification_id = :n AND flow = :flow"),
                        {"n": notification_id, "flow": flow}).scalar_one(), False


def get_run(conn: Connection, run_id: int, lock: bool = False) -> dict[str, Any] | None:
    """One run; with `lock` the row is locked until the transaction ends."""
    row = conn.execute(sa.text(f"SELECT {RUN_COLUMNS} FROM campaign_runs WHERE id = :id"
                               + (" FOR UPDATE" if lock else "")), {"id": run_id}).first()
    return dict(row._mapping) if row else None


def advance_run(conn: Connection, run_id: int, *, rows: int, claimed: int, duplicates: int,
                fetch_done: bool) -> None:
    """Move the page cursor past `rows` and add the page's counts (same transaction as the claim)."""
    conn.execute(sa.text("""
        UPDATE campaign_runs
        SET cursor = cursor + :rows, pages_fetched = pages_fetched + 1, fetched = fetched + :rows,
            claimed = claimed + :claimed, duplicates_skipped = duplicates_skipped + :dups,
            fetch_done = fetch_done OR :done, attempts = 0, last_error = NULL, updated_at = now()
        WHERE id = :id"""), {"id": run_id, "rows": rows, "claimed": claimed, "dups": duplicates, "done": fetch_done})


def touch_run(conn: Connection, run_id: int, error: str | None = None, count_attempt: bool = False) -> int:
    """Heartbeat a waiting run (and note an error); return its attempt count."""
    return conn.execute(sa.text("""
        UPDATE campaign_runs SET updated_at = now(), last_error = COALESCE(:e, last_error),
               attempts = attempts + CASE WHEN :count THEN 1 ELSE 0 END
        WHERE id = :id RETURNING attempts"""), {"id": run_id, "e": error, "count": count_attempt}).scalar_one()


def end_run(conn: Connection, run_id: int, status: str, reason: str) -> None:
    """End a running run with `status` (e.g. `deadline_missed`) and a reason."""
    conn.execute(sa.text("""
        UPDATE campaign_runs SET status = :s, last_error = :r, updated_at = now(), finished_at = now()
        WHERE id = :id AND status = 'running'"""), {"id": run_id, "s": status, "r": reason[:2000]})


def run_deadline(conn: Connection, run_id: int) -> Any:
    """The run's deadline (None for runs without one)."""
    return conn.execute(sa.text("SELECT deadline FROM campaign_runs WHERE id = :id"), {"id": run_id}).scalar()


def database_now(conn: Connection) -> Any:
    """Postgres' clock: the one clock every deadline and due time is judged by."""
    return conn.execute(sa.text("SELECT now()")).scalar_one()


def fail_run(conn: Connection, run_id: int, reason: str) -> dict[str, Any] | None:
    """Park a run whose pages cannot be fetched (permanent error or too many attempts); return its flow, status
    and seconds since it started (None when it was not running)."""
    row = conn.execute(sa.text("""
        UPDATE campaign_runs SET status = 'failed', last_error = :r, updated_at = now(), finished_at = now()
        WHERE id = :id AND status = 'running'
        RETURNING flow, status, EXTRACT(EPOCH FROM finished_at - created_at)::float8 AS seconds"""),
        {"id": run_id, "r": reason[:2000]}).first()
    return dict(row._mapping) if row else None


def finish_run_if_complete(conn: Connection, run_id: int) -> dict[str, Any] | None:
    """Mark a run `done` once all pages are fetched and no row of it, in any ledger, is still in flight
    (claimed, or waiting for its due time) and no customer status of it is unreported (`deadline_missed`
    instead when a deadline expired some of its grants); return the finished run's id, flow, sent count,
    status and seconds since it started, else None."""
    in_flight = " AND ".join([f"NOT EXISTS (SELECT 1 FROM {t.name} WHERE run_id = :id AND status = '{s}')"
                              for t in LEDGER_TABLES for s in t.in_flight]
                             + ["NOT EXISTS (SELECT 1 FROM promotion_statuses WHERE run_id = :id AND reported_at IS NULL)"])
    row = conn.execute(sa.text(f"""
        UPDATE campaign_runs SET finished_at = now(), updated_at = now(),
               status = CASE WHEN expired > 0 THEN 'deadline_missed' ELSE 'done' END
        WHERE id = :id AND status = 'running' AND fetch_done AND {in_flight}
        RETURNING id, flow, sent, status, EXTRACT(EPOCH FROM finished_at - created_at)::float8 AS seconds"""),
        {"id": run_id}).first()
    return dict(row._mapping) if row else None


# -- deadlines and promotion statuses (conditional runs) ------------------------------------

def deadline_near(conn: Connection, run_id: int, margin_s: float) -> Any:
    """The run's deadline if it is less than `margin_s` seconds away (Postgres' clock) or past; else None."""
    return conn.execute(sa.text("""
        SELECT deadline FROM campaign_runs
        WHERE id = :id AND deadline IS NOT NULL AND deadline <= now() + make_interval(secs => :m)"""),
        {"id": run_id, "m": margin_s}).scalar()


def expire_claimed(conn: Connection, run_id: int, ids: Sequence[int] | None, reason: str) -> list[int]:
    """Mark the run's claimed grants (all, or those among `ids`) `expired`: never sent. Counted on the run."""
    rows = [r[0] for r in conn.execute(sa.text(f"""
        UPDATE grants SET status = 'expired', reason = :reason, updated_at = now()
        WHERE run_id = :run AND status = 'claimed' {"AND id = ANY(:ids)" if ids is not None else ""}
        RETURNING id"""), {"run": run_id, "reason": reason, "ids": list(ids or [])})]
    if rows:
        conn.execute(sa.text("UPDATE campaign_runs SET expired = expired + :n WHERE id = :id"),
                     {"id": run_id, "n": len(rows)})
    return rows


def record_promotion_statuses(conn: Connection, run_id: int, campaign_id: int, customers: Sequence[str]) -> int:
    """Record the outcome of each of `customers` whose codes in the campaign are all settled: true when every
    code was granted. Customers already recorded are left alone. Returns how many were recorded."""
    if not customers:
        return 0
    return conn.execute(sa.text("""
        INSERT INTO promotion_statuses (run_id, campaign_id, customer_id, status)
        SELECT :run, :campaign, g.customer_id, bool_and(g.status = 'granted')
        FROM grants g
        WHERE g.campaign_id = :campaign AND g.scope = 0 AND g.customer_id = ANY(:customers)
        GROUP BY g.customer_id
        HAVING bool_and(g.status <> 'claimed')
        ON CONFLICT DO NOTHING"""), {"run": run_id, "campaign": campaign_id, "customers": list(customers)}).rowcount


def unreported_statuses(conn: Connection, run_id: int, limit: int) -> list[tuple[str, bool]]:
    """Up to `limit` (customer, status) of the run not reported yet, locked (others skip them)."""
    return [tuple(r) for r in conn.execute(sa.text("""
        SELECT customer_id, status FROM promotion_statuses
        WHERE run_id = :run AND reported_at IS NULL
        ORDER BY created_at, customer_id LIMIT :limit FOR UPDATE SKIP LOCKED"""), {"run": run_id, "limit": limit})]


def mark_reported(conn: Connection, run_id: int, statuses: Sequence[tuple[str, bool]]) -> None:
    """Record that `statuses` reached Optimove; count them on the run."""
    conn.execute(sa.text("""
        UPDATE promotion_statuses SET reported_at = now()
        WHERE run_id = :run AND customer_id = ANY(:customers) AND reported_at IS NULL"""),
        {"run": run_id, "customers": [c for c, _ in statuses]})
    conn.execute(sa.text("""
        UPDATE campaign_runs SET reported_true = reported_true + :t, reported_false = reported_false + :f
        WHERE id = :id"""),  # not updated_at: it is the paging heartbeat (`claim_stale_runs`)
        {"id": run_id, "t": sum(1 for _, s in statuses if s), "f": sum(1 for _, s in statuses if not s)})


REPORTING_STATUSES = ("running", "failed")  # a parked run still reports the statuses of what it granted


def runs_to_report(conn: Connection, older_than_s: float, at_least: int) -> list[int]:
    """Running (or parked) runs before their deadline with unreported statuses: `at_least` of them, or one
    older than `older_than_s`, or any once nothing of the run is left to settle."""
    return [r[0] for r in conn.execute(sa.text("""
        SELECT r.id FROM campaign_runs r
        JOIN LATERAL (SELECT count(*) AS n, min(created_at) AS oldest FROM promotion_statuses p
                      WHERE p.run_id = r.id AND p.reported_at IS NULL) u ON u.n > 0
        WHERE r.status IN ('running', 'failed') AND r.deadline IS NOT NULL AND r.deadline > now()
          AND (u.n >= :least OR u.oldest < now() - make_interval(secs => :age)
               OR (r.fetch_done AND NOT EXISTS (SELECT 1 FROM grants g WHERE g.run_id = r.id AND g.status = 'claimed')))
        ORDER BY r.deadline"""), {"least": at_least, "age": older_than_s})]


def close_overdue_runs(conn: Connection) -> list[dict[str, Any]]:
    """Running runs whose deadline has passed: their claimed grants become `expired`, and each run ends
    `done` if everything was fetched and settled, else `deadline_missed`. Returns the closed runs."""
    closed = []
    for (run_id,) in conn.execute(sa.text("""
            SELECT id FROM campaign_runs WHERE status = 'running' AND deadline IS NOT NULL AND deadline <= now()
            ORDER BY id FOR UPDATE SKIP LOCKED""")).fetchall():
        expired = expire_claimed(conn, run_id, None, "ClearanceRequiredBy passed before the grant was sent")
        row = conn.execute(sa.text(f"""
            UPDATE campaign_runs r SET finished_at = now(), updated_at = now(),
                   status = CASE WHEN r.fetch_done AND :expired = 0 AND NOT EXISTS (
                                     SELECT 1 FROM promotion_statuses p WHERE p.run_id = r.id AND p.reported_at IS NULL)
                                 THEN 'done' ELSE 'deadline_missed' END
            WHERE r.id = :id RETURNING {RUN_COLUMNS}"""), {"id": run_id, "expired": len(expired)}).first()
        closed.append(dict(row._mapping))
    return closed


def unreported_count(conn: Connection, run_id: int) -> int:
    """Customer statuses of the run that never reached Optimove."""
    return conn.execute(sa.text(
        "SELECT count(*) FROM promotion_statuses WHERE run_id = :id AND reported_at IS NULL"), {"id": run_id}).scalar_one()


def runs_for_campaign(conn: Connection, campaign_id: int) -> list[dict[str, Any]]:
    """Every run of a campaign, oldest first."""
    return _rows(conn.execute(sa.text(
        f"SELECT {RUN_COLUMNS} FROM campaign_runs WHERE campaign_id = :c ORDER BY id"), {"c": campaign_id}))


def claim_stale_runs(conn: Connection, older_than_s: float, limit: int = 500) -> list[dict[str, Any]]:
    """Running runs untouched for `older_than_s` (their task was lost); the clock is reset.

    `updated_at` of a run is its paging heartbeat: only page tasks (and their waits) touch it, not
    the settling of its batches, so a run whose page task died is found while its sends still settle.
    """
    return _rows(conn.execute(sa.text("""
        UPDATE campaign_runs SET updated_at = now()
        WHERE id IN (SELECT id FROM campaign_runs
                     WHERE status = 'running' AND updated_at < now() - make_interval(secs => :age)
                     ORDER BY id LIMIT :limit FOR UPDATE SKIP LOCKED)
        RETURNING id, fetch_done"""), {"age": older_than_s, "limit": limit}))


# -- ledgers (grants, sends) ---------------------------------------------------------------

@dataclass(frozen=True)
class LedgerTable:
    """A ledger table: rows move `claimed -> <done> | rejected | failed`; `done` is also the run's count column.

    A table with a `due_column` holds rows whose time is still ahead as `waiting` (decided by
    Postgres' clock when they are claimed) until `release_due` makes them `claimed`.
    """

    name: str
    done: str
    unique: str
    columns: tuple[str, ...]
    due_column: str | None = None

    @property
    def in_flight(self) -> tuple[str, ...]:
        """Statuses of rows not settled yet."""
        return ("claimed", "waiting") if self.due_column else ("claimed",)


GRANTS = LedgerTable("grants", "granted", "grants_once_per_scope",
                     ("campaign_id", "channel_id", "customer_id", "promo_code", "notification_id", "scope"))
SENDS = LedgerTable("sends", "sent", "sends_once_per_scope",
                    ("campaign_id", "channel_id", "customer_id", "template_id", "attributes", "promo_codes",
                     "scheduled_time", "notification_id", "scope"), due_column="scheduled_time")
REVOKES = LedgerTable("revokes", "revoked", "revokes_once_per_grant",
                      ("campaign_id", "channel_id", "customer_id", "promo_code", "grant_id", "grant_reference",
                       "notification_id", "scope"))
LEDGER_TABLES = (GRANTS, SENDS, REVOKES)


class Claimed(list):
    """What a claim won and may deliver now (ids or rows); `waiting` counts the rows it won that wait
    for their due time."""

    waiting: int = 0


@dataclass(frozen=True)
class ClaimedRow:
    """A ledger row this caller owns and must deliver: its key, source, attempts and `table.columns`."""

    id: int
    run_id: int | None
    source: str
    idempotency_key: str
    attempts: int
    values: dict[str, Any]


def claim(conn: Connection, table: LedgerTable, fixed: dict[str, Any],
          varying: dict[str, tuple[str, Sequence[Any]]], rows: bool = False) -> Claimed:
    """Insert ledger rows in one statement; return the ids this call claimed that are due now (with
    `rows`, the rows), and in `.waiting` how many it claimed for later.

    `fixed` holds the values shared by every row, `varying` a (Postgres type, values) column per
    field, all of the same length. Rows already in the ledger (another channel, a duplicate
    notification) are skipped by the unique constraint, not by a check, so concurrent claimers
    never both win. Callers sort the rows by the unique key, so concurrent claimers of
    overlapping pages take their row locks in the same order and cannot deadlock. Rows of a table
    with a due column whose time is ahead of Postgres' clock are stored `waiting`.
    """
    if not varying or not next(iter(varying.values()))[1]:
        return Claimed()
    names = list(fixed) + list(varying)
    returning = _claimed_columns(table) if rows else "id"
    # Arrays through unnest instead of a VALUES list: Postgres parses and plans one small
    # statement instead of 15,000 row literals (about 2.5x the rows/s for an Optimove page).
    select = ", ".join(["%s"] * len(fixed) + [f"u.{name}" for name in varying])
    timed = table.due_column in varying
    if timed:
        names.append("status")
        select += f", CASE WHEN u.{table.due_column} > now() THEN 'waiting' ELSE 'claimed' END"
        returning += ", status"
    arrays = ", ".join(f"%s::{pg_type}[]" for pg_type, _ in varying.values())
    cur = _raw(conn)
    cur.execute(f"""
        INSERT INTO {table.name} ({", ".join(names)})
        SELECT {select} FROM unnest({arrays}) AS u({", ".join(varying)})
        ON CONFLICT ON CONSTRAINT {table.unique} DO NOTHING RETURNING {returning}""",
                (*fixed.values(), *(list(values) for _, values in varying.values())))
    found = cur.fetchall()
    out = Claimed()
    if timed:
        out.waiting = sum(1 for r in found if r[-1] == "waiting")
        found = [r[:-1] for r in found if r[-1] != "waiting"]
    if rows:
        out.extend(_claimed_row(table, row) for row in found)
    else:
        out.extend(r[0] for r in found)
    return out


def release_due(conn: Connection, table: LedgerTable, limit: int = 20_000) -> list[tuple[int | None, int, str]]:
    """Make `waiting` rows whose time has come (Postgres' clock) `claimed`; return their (run_id, id, source).

    Each row is released once: concurrent callers skip the rows another one locked.
    """
    if table.due_column is None:
        return []
    return [tuple(r) for r in conn.execute(sa.text(f"""
        UPDATE {table.name} SET status = 'claimed', updated_at = now()
        WHERE id IN (SELECT id FROM {table.name}
                     WHERE status = 'waiting' AND {table.due_column} <= now()
                     ORDER BY {table.due_column} LIMIT :limit FOR UPDATE SKIP LOCKED)
        RETURNING run_id, id, source"""), {"limit": limit})]


def next_due(conn: Connection, table: LedgerTable) -> Any:
    """The earliest due time among `waiting` rows, or None."""
    if table.due_column is None:
        return None
    return conn.execute(sa.text(
        f"SELECT min({table.due_column}) FROM {table.name} WHERE status = 'waiting'")).scalar_one()


def _claimed_columns(table: LedgerTable) -> str:
    """The columns a `ClaimedRow` is read from, in `_claimed_row`'s order."""
    return f"id, run_id, source, idempotency_key, attempts, {', '.join(table.columns)}"


def _claimed_row(table: LedgerTable, row: tuple) -> ClaimedRow:
    return ClaimedRow(*row[:5], dict(zip(table.columns, row[5:])))


def claimed_rows(conn: Connection, table: LedgerTable, ids: Iterable[int]) -> list[ClaimedRow]:
    """The rows among `ids` that are still `claimed` (already settled ones are left out)."""
    ids = list(ids)
    if not ids:
        return []
    cur = _raw(conn)
    cur.execute(f"""
        SELECT {_claimed_columns(table)}
        FROM {table.name} WHERE id = ANY(%s::bigint[]) AND status = 'claimed' ORDER BY id""", (ids,))
    return [_claimed_row(table, row) for row in cur.fetchall()]


@dataclass
class Settlement:
    """How many rows of one batch moved to each final state."""

    done: int = 0
    rejected: int = 0
    failed: int = 0
    retry_ids: list[int] | None = None


def settle(conn: Connection, table: LedgerTable, run_id: int | None, *, done: Sequence[tuple[int, str | None]],
           rejected: Sequence[tuple[int, str]], retry: Sequence[tuple[int, str]], max_attempts: int) -> Settlement:
    """Record a peer's reply; only `claimed` rows move, so a replayed batch counts nothing twice."""
    cur = _raw(conn)
    out = Settlement(retry_ids=[])
    # Arrays through unnest rather than VALUES lists: one short statement whatever the batch size.
    # `t.id = ANY(ids)` beside the join: with statistics taken before a campaign claimed its rows,
    # Postgres estimated ~1 claimed row and planned a nested loop over a seq scan of the claimed
    # rows (270 s for one 5,000-row batch of a 1M campaign); the ANY makes it a primary-key scan (40 ms).
    if done:
        cur.execute(f"""
            UPDATE {table.name} t SET status = '{table.done}', reference = v.ref, attempts = t.attempts + 1,
                   reason = NULL, updated_at = now()
            FROM unnest(%s::bigint[], %s::text[]) AS v(id, ref)
            WHERE t.id = v.id AND t.id = ANY(%s::bigint[]) AND t.status IN ('claimed', 'cancelled', 'expired')""",
                    ([i for i, _ in done], [ref for _, ref in done], [i for i, _ in done]))
        out.done = cur.rowcount
    if rejected:
        cur.execute(f"""
            UPDATE {table.name} t SET status = 'rejected', reason = v.reason, attempts = t.attempts + 1,
                   updated_at = now()
            FROM unnest(%s::bigint[], %s::text[]) AS v(id, reason)
            WHERE t.id = v.id AND t.id = ANY(%s::bigint[]) AND t.status = 'claimed'""",
                    ([i for i, _ in rejected], [r[:1000] for _, r in rejected], [i for i, _ in rejected]))
        out.rejected = cur.rowcount
    if retry:
        cur.execute(f"""
            UPDATE {table.name} t SET attempts = t.attempts + 1, reason = v.reason, updated_at = now(),
                   status = CASE WHEN t.attempts + 1 >= %s THEN 'failed' ELSE 'claimed' END
            FROM unnest(%s::bigint[], %s::text[]) AS v(id, reason)
            WHERE t.id = v.id AND t.id = ANY(%s::bigint[]) AND t.status = 'claimed'
            RETURNING t.id, t.status""",
                    (int(max_attempts), [i for i, _ in retry], [r[:1000] for _, r in retry], [i for i, _ in retry]))
        rows = cur.fetchall()
        out.failed = sum(1 for _, status in rows if status == "failed")
        out.retry_ids = [i for i, status in rows if status == "claimed"]
    if run_id is not None and (out.done or out.rejected or out.failed):
        conn.execute(sa.text(f"""
            UPDATE campaign_runs SET {table.done} = {table.done} + :d, rejected = rejected + :r,
                   failed = failed + :f WHERE id = :id"""),  # not updated_at: it is the paging heartbeat
                     {"id": run_id, "d": out.done, "r": out.rejected, "f": out.failed})
    return out


def claim_stale(conn: Connection, table: LedgerTable, older_than_s: float,
                limit: int = 10_000) -> list[tuple[int | None, int, str]]:
    """(run_id, id, source) of claimed rows untouched for `older_than_s`; their clock is reset."""
    return [tuple(r) for r in conn.execute(sa.text(f"""
        UPDATE {table.name} SET updated_at = now()
        WHERE id IN (SELECT id FROM {table.name} WHERE status = 'claimed'
                       AND updated_at < now() - make_interval(secs => :age)
                     ORDER BY id LIMIT :limit FOR UPDATE SKIP LOCKED)
        RETURNING run_id, id, source"""), {"age": older_than_s, "limit": limit})]


def _per_run(run_ids: Iterable[int | None]) -> Counter:
    """How many of some ledger rows each run holds (rows without a run are left out)."""
    return Counter(run_id for run_id in run_ids if run_id is not None)


def redrive_failed(conn: Connection, table: LedgerTable, campaign_id: int) -> list[tuple[int | None, int, str]]:
    """Put a campaign's failed rows back to `claimed` with fresh attempts; return (run_id, id, source)."""
    rows = [tuple(r) for r in conn.execute(sa.text(f"""
        UPDATE {table.name} SET status = 'claimed', attempts = 0, updated_at = now()
        WHERE campaign_id = :c AND status = 'failed' RETURNING run_id, id, source"""), {"c": campaign_id})]
    for run_id, n in _per_run(run_id for run_id, _, _ in rows).items():
        conn.execute(sa.text("""
            UPDATE campaign_runs SET failed = failed - :n, status = 'running', finished_at = NULL,
                   updated_at = now() WHERE id = :id AND fetch_done"""), {"id": run_id, "n": n})
    return rows


def redrive_failed_runs(conn: Connection, campaign_id: int) -> list[dict[str, Any]]:
    """Put a campaign's failed runs back to `running` with fresh attempts; return (id, fetch_done) rows."""
    return _rows(conn.execute(sa.text("""
        UPDATE campaign_runs SET status = 'running', attempts = 0, finished_at = NULL, updated_at = now()
        WHERE campaign_id = :c AND status = 'failed' RETURNING id, fetch_done"""), {"c": campaign_id}))


def waiting_per_run(conn: Connection, campaign_id: int) -> dict[int, int]:
    """Rows waiting for their due time, per run of a campaign."""
    return {r: n for r, n in conn.execute(sa.text(
        "SELECT run_id, count(*) FROM sends WHERE campaign_id = :c AND status = 'waiting' AND run_id IS NOT NULL "
        "GROUP BY run_id"), {"c": campaign_id})}


# -- cancellation ----------------------------------------------------------------------------

def cancel_pending(conn: Connection, campaign_id: int, reason: str) -> dict[str, Any]:
    """Stop a campaign's pending work: running runs `cancelled` (paging stops), claimed grants and claimed or
    waiting sends `cancelled` (never delivered). Returns how many of each, and in `ended_runs` the flow,
    status and seconds since it started of each run it ended."""
    runs = _rows(conn.execute(sa.text("""
        UPDATE campaign_runs SET status = 'cancelled', last_error = :r, finished_at = now(), updated_at = now()
        WHERE campaign_id = :c AND status = 'running'
        RETURNING id, flow, status, EXTRACT(EPOCH FROM finished_at - created_at)::float8 AS seconds"""),
        {"c": campaign_id, "r": reason}))
    out: dict[str, Any] = {"runs": len(runs), "ended_runs": runs}
    for table in (GRANTS, SENDS):
        rows = conn.execute(sa.text(f"""
            UPDATE {table.name} SET status = 'cancelled', reason = :r, updated_at = now()
            WHERE campaign_id = :c AND status IN ('claimed', 'waiting') RETURNING run_id"""),
            {"c": campaign_id, "r": reason}).fetchall()
        out[table.name] = len(rows)
        for run_id, n in _per_run(run_id for (run_id,) in rows).items():
            conn.execute(sa.text("UPDATE campaign_runs SET cancelled = cancelled + :n WHERE id = :id"),
                         {"id": run_id, "n": n})
    return out


def add_cancelled_customers(conn: Connection, campaign_id: int, customers: Sequence[str]) -> None:
    """Remember the customers on a campaign's cancellation list."""
    if customers:
        conn.execute(sa.text("""
            INSERT INTO cancelled_customers (campaign_id, customer_id)
            SELECT :c, unnest(CAST(:customers AS text[])) ON CONFLICT DO NOTHING"""),
            {"c": campaign_id, "customers": list(customers)})


def granted_to(conn: Connection, campaign_id: int, customers: Sequence[str],
               cancelled_only: bool = False) -> list[tuple]:
    """(grant id, customer, code, reference) of the campaign's granted grants to `customers` (with
    `cancelled_only`, only those on its cancellation list), that no revoke claimed yet."""
    if not customers:
        return []
    listed = ("AND EXISTS (SELECT 1 FROM cancelled_customers x WHERE x.campaign_id = g.campaign_id "
              "AND x.customer_id = g.customer_id)") if cancelled_only else ""
    return [tuple(r) for r in conn.execute(sa.text(f"""
        SELECT g.id, g.customer_id, g.promo_code, g.reference FROM grants g
        WHERE g.campaign_id = :c AND g.customer_id = ANY(:customers) AND g.status = 'granted' {listed}
          AND NOT EXISTS (SELECT 1 FROM revokes r WHERE r.grant_id = g.id)
        ORDER BY g.id"""), {"c": campaign_id, "customers": list(customers)})]


def unrevoked_cancelled_grants(conn: Connection, limit: int = 10_000) -> dict[int, list[str]]:
    """Campaign -> customers on its cancellation list holding a granted grant that no revoke claimed (a grant
    that settled after the list was read)."""
    out: dict[int, list[str]] = {}
    for campaign_id, customer_id in conn.execute(sa.text("""
            SELECT DISTINCT g.campaign_id, g.customer_id FROM grants g
            JOIN cancelled_customers x ON x.campaign_id = g.campaign_id AND x.customer_id = g.customer_id
            WHERE g.status = 'granted' AND NOT EXISTS (SELECT 1 FROM revokes r WHERE r.grant_id = g.id)
            LIMIT :limit"""), {"limit": limit}):
        out.setdefault(campaign_id, []).append(customer_id)
    return out


def grants_of_ended_actions(conn: Connection, ended: Sequence[tuple[str, int, int | None]]) -> dict[int, list[tuple]]:
    """Campaign -> (grant id, customer, code, reference) of granted grants, not yet revoked, made for the
    (customer, ActionID, ChannelID) of `ended` (a channel of 0 or none matches any)."""
    if not ended:
        return {}
    out: dict[int, list[tuple]] = {}
    for campaign_id, grant_id, customer, code, reference in conn.execute(sa.text("""
            SELECT DISTINCT g.campaign_id, g.id, g.customer_id, g.promo_code, g.reference
            FROM unnest(CAST(:customers AS text[]), CAST(:actions AS bigint[]), CAST(:channels AS bigint[]))
                 AS e(customer_id, action_id, channel_id)
            JOIN grants g ON g.customer_id = e.customer_id AND g.action_id = e.action_id
                         AND (coalesce(e.channel_id, 0) = 0 OR g.channel_id IS NULL OR g.channel_id = e.channel_id)
            WHERE g.status = 'granted' AND NOT EXISTS (SELECT 1 FROM revokes r WHERE r.grant_id = g.id)
            ORDER BY g.id"""), {"customers": [c for c, _, _ in ended], "actions": [a for _, a, _ in ended],
                                "channels": [ch for _, _, ch in ended]}):
        out.setdefault(campaign_id, []).append((grant_id, customer, code, reference))
    return out


def deactivated_dates(conn: Connection, since: Any) -> set:
    """Dates since `since` whose ended actions were processed."""
    return {r[0] for r in conn.execute(sa.text(
        "SELECT date FROM deactivations WHERE date >= :since AND status = 'done'"), {"since": since})}


def start_deactivation(conn: Connection, day: Any) -> None:
    """Record that a date's ended actions are being processed (again, after a failure)."""
    conn.execute(sa.text("""
        INSERT INTO deactivations (date) VALUES (:d)
        ON CONFLICT (date) DO UPDATE SET status = 'running', last_error = NULL WHERE deactivations.status <> 'done'"""),
        {"d": day})


def finish_deactivation(conn: Connection, day: Any, status: str, rows_read: int, revokes: int,
                        error: str | None = None) -> None:
    """Record a date's outcome."""
    conn.execute(sa.text("""
        UPDATE deactivations SET status = :s, rows_read = :n, revokes = revokes + :r, last_error = :e,
               finished_at = now() WHERE date = :d"""),
        {"d": day, "s": status, "n": rows_read, "r": revokes, "e": error and error[:2000]})


def cancellation_run(conn: Connection, campaign_id: int) -> int | None:
    """The latest cancellation run of a campaign, if it was cancelled."""
    return conn.execute(sa.text("""
        SELECT max(id) FROM campaign_runs WHERE campaign_id = :c AND flow = 'cancellation'"""),
        {"c": campaign_id}).scalar()


def set_grant_status(conn: Connection, grant_ids: Sequence[int], status: str, reason: str | None = None) -> None:
    """Record a revoke's effect on its grants (`revoked`, `revoke_unsupported`)."""
    if grant_ids:
        conn.execute(sa.text("""
            UPDATE grants SET status = :s, reason = COALESCE(:r, reason), updated_at = now()
            WHERE id = ANY(:ids) AND status = 'granted'"""), {"s": status, "r": reason, "ids": list(grant_ids)})


# -- metrics reports -----------------------------------------------------------------------

def sent_per_template(conn: Connection, run_id: int) -> list[tuple[int, int]]:
    """(template id, sends made) of a run."""
    return [tuple(r) for r in conn.execute(sa.text(
        "SELECT template_id, count(*) FROM sends WHERE run_id = :id AND status = 'sent' GROUP BY 1 ORDER BY 1"),
        {"id": run_id})]


def mark_metrics(conn: Connection, run_id: int, error: str | None = None) -> bool:
    """Record that a run's metrics were reported (or could not be: `error`); False if already recorded."""
    return conn.execute(sa.text("""
        UPDATE campaign_runs SET metrics_reported_at = CASE WHEN :e IS NULL THEN now() END, metrics_error = :e
        WHERE id = :id AND metrics_reported_at IS NULL AND metrics_error IS NULL RETURNING id"""),
        {"id": run_id, "e": error[:2000] if error else None}).first() is not None


def runs_with_metrics_due(conn: Connection, older_than_s: float, limit: int = 100) -> list[int]:
    """Finished runs that sent something and whose metrics report is still missing after `older_than_s`."""
    return [r[0] for r in conn.execute(sa.text("""
        SELECT id FROM campaign_runs
        WHERE status = 'done' AND sent > 0 AND metrics_reported_at IS NULL AND metrics_error IS NULL
          AND finished_at < now() - make_interval(secs => :age)
        ORDER BY id LIMIT :limit"""), {"age": older_than_s, "limit": limit})]


def ledger_counts(conn: Connection, table: LedgerTable, campaign_id: int) -> dict[str, int]:
    """Ledger rows of a campaign by status."""
    return {s: n for s, n in conn.execute(sa.text(
        f"SELECT status, count(*) FROM {table.name} WHERE campaign_id = :c GROUP BY status"), {"c": campaign_id})}


# -- operator re-drive and inspection (`relay grants|sends retry`, `relay notifications`) ----------

def campaigns_with_status(conn: Connection, table: LedgerTable, status: str,
                          campaign_id: int | None = None) -> dict[int, int]:
    """Campaign -> number of its rows of `table` in `status` (only `campaign_id`'s when given)."""
    return {c: n for c, n in conn.execute(sa.text(f"""
        SELECT campaign_id, count(*) FROM {table.name}
        WHERE status = :s AND (CAST(:c AS bigint) IS NULL OR campaign_id = :c)
        GROUP BY campaign_id ORDER BY campaign_id"""), {"s": status, "c": campaign_id})}


def campaign_known(conn: Connection, campaign_id: int) -> bool:
    """Whether the relay has any notification, run or ledger row of the campaign."""
    parts = ["SELECT 1 FROM notifications WHERE campaign_id = :c", "SELECT 1 FROM campaign_runs WHERE campaign_id = :c"]
    parts += [f"SELECT 1 FROM {t.name} WHERE campaign_id = :c" for t in LEDGER_TABLES]
    return conn.execute(sa.text("SELECT " + " OR ".join(f"EXISTS ({p})" for p in parts)),
                        {"c": campaign_id}).scalar_one()


NOTIFICATION_COLUMNS = ("id, event_type, campaign_id, channel_id, dedupe_key, status, attempts, last_error, "
                        "received_at, updated_at, processed_at")


def list_notifications(conn: Connection, *, status: str | None = None, event_type: int | None = None,
                       campaign_id: int | None = None, limit: int = 50) -> list[dict[str, Any]]:
    """The newest `limit` notifications (without payload), newest first, filtered when given."""
    return _rows(conn.execute(sa.text(f"""
        SELECT {NOTIFICATION_COLUMNS} FROM notifications
        WHERE (CAST(:s AS text) IS NULL OR status = :s) AND (CAST(:e AS integer) IS NULL OR event_type = :e)
          AND (CAST(:c AS bigint) IS NULL OR campaign_id = :c)
        ORDER BY id DESC LIMIT :limit"""), {"s": status, "e": event_type, "c": campaign_id, "limit": limit}))


def notification_runs(conn: Connection, notification_id: int) -> list[dict[str, Any]]:
    """The runs a notification opened, oldest first."""
    return _rows(conn.execute(sa.text(
        f"SELECT {RUN_COLUMNS} FROM campaign_runs WHERE notification_id = :n ORDER BY id"), {"n": notification_id}))


def notification_ledger_counts(conn: Connection, notification_id: int) -> dict[str, dict[str, int]]:
    """Ledger rows by status that a notification claimed (itself, real-time, or through its runs)."""
    out: dict[str, dict[str, int]] = {}
    for table in LEDGER_TABLES:
        out[table.name] = {s: n for s, n in conn.execute(sa.text(f"""
            SELECT status, count(*) FROM {table.name}
            WHERE notification_id = :n OR run_id IN (SELECT id FROM campaign_runs WHERE notification_id = :n)
            GROUP BY status ORDER BY status"""), {"n": notification_id})}
    return out


def replay_notification(conn: Connection, notification_id: int) -> dict[str, Any] | None:
    """Put a notification back to `received` (fresh attempts) and its finished runs back to paging from the
    first page; the ledgers' unique keys keep what they claimed before from being claimed again.

    Runs that were cancelled, or whose deadline has passed, are left alone. Returns the notification's
    id, event type and previous status plus `runs` (ids of the runs reopened), or None if there is none.
    """
    row = conn.execute(sa.text("""
        UPDATE notifications n SET status = 'received', attempts = 0, last_error = NULL, processed_at = NULL,
               updated_at = now()
        FROM (SELECT id, status FROM notifications WHERE id = :id FOR UPDATE) old
        WHERE n.id = old.id RETURNING n.id, n.event_type, n.campaign_id, old.status AS previous"""),
        {"id": notification_id}).first()
    if row is None:
        return None
    runs = [r[0] for r in conn.execute(sa.text("""
        UPDATE campaign_runs SET status = 'running', cursor = 0, fetch_done = false, attempts = 0,
               last_error = NULL, finished_at = NULL, updated_at = now()
        WHERE notification_id = :n AND status IN ('done', 'failed') AND (deadline IS NULL OR deadline > now())
        RETURNING id"""), {"n": notification_id})]
    return {**dict(row._mapping), "runs": sorted(runs)}


# -- admin views (`/admin`, `/api/overview`, `/api/campaigns`, `/api/notifications`) ----------
# Every query here is bounded: newest first by primary key with a LIMIT, or by an indexed key.

NOTIFICATION_STATUSES = ("received", "processing", "done", "ignored", "failed")
RUN_STATUSES = ("running", "done", "failed", "cancelled", "deadline_missed")
LEDGER_STATUSES = {
    "grants": ("claimed", "granted", "rejected", "failed", "expired", "cancelled", "revoked", "revoke_unsupported"),
    "sends": ("waiting", "claimed", "sent", "rejected", "failed", "cancelled"),
    "revokes": ("claimed", "revoked", "rejected", "failed"),
}
# a status of any ledger is a valid filter of every ledger (one of another ledger just finds no rows)
ANY_LEDGER_STATUS = tuple(dict.fromkeys(s for statuses in LEDGER_STATUSES.values() for s in statuses))
LEDGER_ROW_COLUMNS = {
    "grants": ("id", "run_id", "notification_id", "channel_id", "customer_id", "promo_code", "source", "status",
               "attempts", "reference", "reason", "created_at", "updated_at"),
    "sends": ("id", "run_id", "notification_id", "channel_id", "customer_id", "template_id", "scheduled_time",
              "source", "status", "attempts", "reference", "reason", "created_at", "updated_at"),
    "revokes": ("id", "run_id", "notification_id", "channel_id", "customer_id", "promo_code", "grant_id", "source",
                "status", "attempts", "reference", "reason", "created_at", "updated_at"),
}
# errors are looked for among this many of the newest rows, so a quiet inbox of millions costs nothing
ERROR_WINDOW = 10_000


def recent_runs(conn: Connection, limit: int, *, status: str | None = None,
                with_deadline: bool = False) -> list[dict[str, Any]]:
    """The newest `limit` runs of every flow (only `status` ones, only runs with a deadline), newest first."""
    return _rows(conn.execute(sa.text(f"""
        SELECT {RUN_COLUMNS} FROM campaign_runs
        WHERE (CAST(:s AS text) IS NULL OR status = :s) {"AND deadline IS NOT NULL" if with_deadline else ""}
        ORDER BY id DESC LIMIT :limit"""), {"s": status, "limit": limit}))


def runs_with_errors(conn: Connection, limit: int) -> list[dict[str, Any]]:
    """The newest runs (among the last `ERROR_WINDOW`) that failed, missed their deadline or carry an error."""
    return _rows(conn.execute(sa.text(f"""
        SELECT {RUN_COLUMNS} FROM campaign_runs
        WHERE id > (SELECT coalesce(max(id), 0) FROM campaign_runs) - :window
          AND (status IN ('failed', 'deadline_missed') OR last_error IS NOT NULL OR metrics_error IS NOT NULL)
        ORDER BY id DESC LIMIT :limit"""), {"window": ERROR_WINDOW, "limit": limit}))


def notifications_with_errors(conn: Connection, limit: int) -> list[dict[str, Any]]:
    """The newest notifications (among the last `ERROR_WINDOW`) that failed or carry an error, without payload."""
    return _rows(conn.execute(sa.text(f"""
        SELECT {NOTIFICATION_COLUMNS} FROM notifications
        WHERE id > (SELECT coalesce(max(id), 0) FROM notifications) - :window
          AND (status = 'failed' OR last_error IS NOT NULL)
        ORDER BY id DESC LIMIT :limit"""), {"window": ERROR_WINDOW, "limit": limit}))


def waiting_for_runs(conn: Connection, run_ids: Sequence[int]) -> dict[int, int]:
    """Sends waiting for their due time, per run among `run_ids` (partial index `sends_waiting_run`)."""
    if not run_ids:
        return {}
    return {r: n for r, n in conn.execute(sa.text(
        "SELECT run_id, count(*) FROM sends WHERE status = 'waiting' AND run_id = ANY(:ids) GROUP BY run_id"),
        {"ids": list(run_ids)})}


def unreported_for_runs(conn: Connection, run_ids: Sequence[int]) -> dict[int, int]:
    """Customer statuses not reported yet, per run among `run_ids` (partial index of the unreported)."""
    if not run_ids:
        return {}
    return {r: n for r, n in conn.execute(sa.text(
        "SELECT run_id, count(*) FROM promotion_statuses WHERE reported_at IS NULL AND run_id = ANY(:ids) "
        "GROUP BY run_id"), {"ids": list(run_ids)})}


def ledger_rows(conn: Connection, table: LedgerTable, campaign_id: int, *, status: str | None = None,
                limit: int = 50, offset: int = 0, before: int | None = None) -> list[dict[str, Any]]:
    """A page of a campaign's rows of one ledger, newest first: `limit` rows after skipping `offset`, only
    ids below `before` when given (keyset paging, as cheap on the last page as on the first)."""
    return _rows(conn.execute(sa.text(f"""
        SELECT {", ".join(LEDGER_ROW_COLUMNS[table.name])} FROM {table.name}
        WHERE campaign_id = :c AND (CAST(:s AS text) IS NULL OR status = :s)
          AND (CAST(:before AS bigint) IS NULL OR id < :before)
        ORDER BY id DESC LIMIT :limit OFFSET :offset"""),
        {"c": campaign_id, "s": status, "before": before, "limit": limit, "offset": offset}))
