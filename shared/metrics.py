"""The relay's Prometheus metrics of work done: one definition each, and the one-line calls that count it.

Counted where the work happens (worker processes mostly), never computed per scrape:

- ledger outcomes when a batch is settled (`shared/flows/ledger.py`), claims and duplicates when a
  page or trigger is claimed, runs when they end (`shared/flows/runs.py`, paging, conditional, cancel);
- every Optimove HTTP call by function and status, its latency and 429s (`shared/optimove/client.py`),
  and the rate limiter's answers (slot or wait, and the wait handed out);
- every bonus / send / revoke HTTP call's latency by outcome (`shared/adapters/http.py`);
- notifications finished by the inbox, by event type and status (`shared/flows/inbox.py`).

Database counts are added after the transaction commits (`after_commit`), so a rolled-back or
replayed transaction counts nothing twice. The metrics are built on first use (`define()`), not at
import, so a process can choose multiprocess mode after importing this module. A worker serves these on its own port
(`RELAY_WORKER_METRICS_PORT`, `workers/metrics.py`); the web serves its own and the scrape-time
gauges (queue depth, backlog) on `/metrics` (`web/metrics.py`). Under prometheus-client's
multiprocess mode (`PROMETHEUS_MULTIPROC_DIR`, set by `relay web` and `relay worker`) the values
live in per-process files that the serving process adds up.
"""
from __future__ import annotations

import threading
from typing import Any, Callable

from prometheus_client import Counter, Histogram

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
WAIT_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
RUN_BUCKETS = (1.0, 5.0, 15.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0, 3600.0, 7200.0, 21600.0, 86400.0)


class Metrics:
    """Every metric of the work done, built once per process by `define()`."""

    def __init__(self):
        self.grants = Counter("relay_grants_total", "Grants settled, by flow and outcome (granted, rejected, "
                              "failed: parked after the last attempt, retry: an attempt to be retried, expired: a "
                              "deadline came first)", ["flow", "outcome"])
        self.sends = Counter("relay_sends_total", "Sends settled, by flow and outcome (sent, rejected, failed, "
                             "retry)", ["flow", "outcome"])
        self.revokes = Counter("relay_revokes_total", "Revokes settled, by flow and outcome (revoked, rejected, "
                               "failed, retry)", ["flow", "outcome"])
        self.claims = Counter("relay_claims_total", "Ledger rows claimed (new in the ledger), by ledger and flow",
                              ["ledger", "flow"])
        self.duplicates = Counter("relay_duplicates_skipped_total", "Rows a page or trigger asked for that were "
                                  "already in the ledger, by flow", ["flow"])
        self.optimove_calls = Counter("relay_optimove_calls_total", "Optimove API calls made, by function and "
                                      "HTTP status (or timeout, connection_error)", ["function", "status"])
        self.optimove_429 = Counter("relay_optimove_429_total", "Optimove answers 429 (its own window was full)")
        self.optimove_seconds = Histogram("relay_optimove_call_seconds", "Optimove API call latency, by function",
                                          ["function"], buckets=LATENCY_BUCKETS)
        self.limiter = Counter("relay_limiter_requests_total", "Rate-limiter answers: slot (call now) or wait",
                               ["outcome"])
        self.limiter_wait = Histogram("relay_limiter_wait_seconds", "Waits the shared rate limiter handed out "
                                      "(the task re-schedules itself for this long)", buckets=WAIT_BUCKETS)
        self.adapter_seconds = Histogram("relay_adapter_call_seconds", "Bonus-system, revoke and send-service "
                                         "HTTP call latency, by adapter and outcome (2xx, 4xx, 5xx, timeout, "
                                         "connection_error)", ["adapter", "outcome"], buckets=LATENCY_BUCKETS)
        self.run_seconds = Histogram("relay_run_duration_seconds", "Campaign runs from start to end, by flow and "
                                     "final status", ["flow", "status"], buckets=RUN_BUCKETS)
        self.notifications = Counter("relay_notifications_processed_total", "Notifications finished by the "
                                     "workers, by event type and status (done, ignored, failed)",
                                     ["event_type", "status"])
        self.ledgers = {"grants": self.grants, "sends": self.sends, "revokes": self.revokes}


_defined: Metrics | None = None
_lock = threading.Lock()


def define() -> Metrics:
    """This process's metrics, registered in the default registry on first use.

    Not at import: prometheus-client picks plain or multiprocess values (`PROMETHEUS_MULTIPROC_DIR`) when a
    metric is built, and `relay worker` chooses only after the CLI has imported the code that counts.
    """
    global _defined
    if _defined is None:
        with _lock:
            if _defined is None:
                _defined = Metrics()
    return _defined


def is_defined() -> bool:
    """Whether `define()` has built the metrics in this process."""
    return _defined is not None


# (ledger, row source) -> flow name, where they differ; other sources are already the flow's name
# (scheduled_bonus, conditional, cancellation, deactivation)
_FLOW_OF_SOURCE = {("grants", "realtime"): "realtime_bonus", ("sends", "realtime"): "realtime_send",
                   ("sends", "scheduled"): "scheduled_send"}


def flow_of(ledger: str, source: str) -> str:
    """The flow name of a ledger row's `source` (`realtime` grants are `realtime_bonus`, and so on)."""
    return _FLOW_OF_SOURCE.get((ledger, source), source)


def after_commit(conn: Any, fn: Callable[[], None]) -> None:
    """Run `fn` when the transaction of SQLAlchemy connection `conn` commits; never when it rolls back.

    Anything that is not a SQLAlchemy `Connection` (no transaction to wait for) runs `fn` at once.
    """
    try:
        from sqlalchemy import event
        from sqlalchemy.engine import Connection
    except ImportError:  # pragma: no cover - SQLAlchemy is a dependency
        fn()
        return
    if not isinstance(conn, Connection):
        fn()
        return
    event.listen(conn, "commit", lambda _conn: _quietly(fn), once=True)


def _quietly(fn: Callable[[], None]) -> None:
    try:
        fn()
    except Exception:  # a metric must never fail a commit
        pass


# -- the calls the code makes (one line each) ---------------------------------------------------

def ledger_settled(ledger: str, source: str, *, done: int = 0, rejected: int = 0, failed: int = 0,
                   retry: int = 0, expired: int = 0) -> None:
    """Count one settled batch of `ledger` (grants, sends, revokes): rows moved to each outcome."""
    counter, flow = define().ledgers[ledger], flow_of(ledger, source)
    success = {"grants": "granted", "sends": "sent", "revokes": "revoked"}[ledger]
    for outcome, n in ((success, done), ("rejected", rejected), ("failed", failed), ("retry", retry),
                       ("expired", expired)):
        if n:
            counter.labels(flow, outcome).inc(n)


def claimed(conn: Any, ledger: str, source: str, won: int, asked: int) -> None:
    """Count a claim of `asked` rows of which `won` were new (once `conn`'s transaction commits)."""
    flow, m = flow_of(ledger, source), define()

    def count() -> None:
        if won:
            m.claims.labels(ledger, flow).inc(won)
        if asked > won:
            m.duplicates.labels(flow).inc(asked - won)

    after_commit(conn, count)


def observe_optimove_call(function: str, status: int | str, seconds: float) -> None:
    """Count one Optimove HTTP call (status: the HTTP status, `timeout` or `connection_error`) and its latency."""
    m = define()
    m.optimove_calls.labels(function, str(status)).inc()
    m.optimove_seconds.labels(function).observe(seconds)
    if status == 429 or status == "429":
        m.optimove_429.inc()


def observe_limiter(wait_seconds: float) -> None:
    """Count one answer of the rate limiter: a slot (0) or a wait of `wait_seconds`."""
    m = define()
    if wait_seconds > 0:
        m.limiter.labels("wait").inc()
        m.limiter_wait.observe(wait_seconds)
    else:
        m.limiter.labels("slot").inc()


def observe_adapter_call(adapter: str, status: int | str, seconds: float) -> None:
    """Count one bonus / revoke / send HTTP call: an HTTP status (kept as its class, `2xx`) or `timeout`,
    `connection_error`, and its latency."""
    outcome = f"{status // 100}xx" if isinstance(status, int) else status
    define().adapter_seconds.labels(adapter, outcome).observe(seconds)


def run_ended(conn: Any, flow: str, status: str, seconds: float | None) -> None:
    """Count a run that ended with `status` after `seconds` (once `conn`'s transaction commits)."""
    m = define()
    after_commit(conn, lambda: m.run_seconds.labels(flow, status).observe(max(0.0, float(seconds or 0.0))))


def run_row_ended(conn: Any, row: dict | None) -> None:
    """`run_ended` for a run row (flow, status, and `seconds` or its created_at / finished_at); None is nothing."""
    if not row:
        return
    seconds = row.get("seconds")
    if seconds is None and row.get("finished_at") is not None and row.get("created_at") is not None:
        seconds = (row["finished_at"] - row["created_at"]).total_seconds()
    run_ended(conn, row["flow"], row["status"], seconds)


def notification_finished(conn: Any, event_type: int, status: str) -> None:
    """Count a notification the inbox finished (done, ignored, failed), once `conn`'s transaction commits."""
    m = define()
    after_commit(conn, lambda: m.notifications.labels(str(event_type), status).inc())
