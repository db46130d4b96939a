"""`GET /metrics` scrape time with a million ledger rows (target: under 50 ms a scrape).

    .venv/bin/python bench/metrics_scrape.py [--database-url URL] [--redis-url URL] [--grants 1000000]
                                             [--notifications 1000000] [--scrapes 50] [--json]

`--database-url` (or `DATABASE_URL`; default the local server `postgresql://postgres@127.0.0.1:5432/postgres`)
names a server's maintenance database: the bench creates a database of its own there
(`relay_bench_metrics_<random>`), migrates it, fills it, and drops it at the end, so it never
touches other data. Redis (`--redis-url` / `REDIS_URL`, default `redis://127.0.0.1:6379/12`) is only
read (the queue lengths).

It inserts, server-side (`INSERT … SELECT FROM generate_series`, one statement per table):
`--grants` grant rows (settled, spread over 2,000 runs), `--notifications` inbox rows (finished, but
`--backlog` of them, 200 by default, still `received` or `processing`), 20,000 campaign runs (40 running, the rest ended,
some in the last hour). Then it times `--scrapes` scrapes of `/metrics` through the Flask test
client of the real app (`web.app.create_app`), with `PROMETHEUS_MULTIPROC_DIR` set as `relay web`
sets it, twice: right after the load (before any ANALYZE: the planner has no statistics yet) and
after `VACUUM ANALYZE` (as autovacuum leaves the tables). Each round starts with one scrape that
is not counted (it opens the connections). For comparison it also times the query the old
`/metrics` ran on every scrape (`SELECT event_type, status, count(*) FROM notifications GROUP BY 1, 2`).

Prints p50 / p99 / max in milliseconds per round. Exits 0 whether or not the target is met.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
import uuid
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

TARGET_MS = 50.0
DEFAULT_DATABASE = "postgresql://postgres@127.0.0.1:5432/postgres"
DEFAULT_REDIS = "redis://127.0.0.1:6379/12"
TOKEN = "bench-token-0123456789abcdef"


def with_database(url: str, name: str) -> str:
    return urlunsplit(urlsplit(url)._replace(path=f"/{name}"))


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile of `values` (q in 0..100)."""
    ordered = sorted(values)
    rank = max(1, min(len(ordered), int(-(-q * len(ordered) // 100))))
    return ordered[rank - 1]


def fill(conn, grants: int, notifications: int, backlog: int) -> dict[str, float]:
    """Insert the rows; return seconds per table."""
    timings = {}
    with conn.cursor() as cur:
        started = time.perf_counter()
        cur.execute("""
            INSERT INTO notifications (event_type, campaign_id, channel_id, dedupe_key, payload, raw_body, status,
                                       attempts, received_at, updated_at, processed_at)
            SELECT CASE WHEN mod(g, 10) = 0 THEN 11 ELSE 13 END, g / 3, 504 + mod(g, 3), 'bench-' || g,
                   '{"EventTypeID": 13}'::jsonb, '{"EventTypeID": 13}',
                   CASE WHEN g <= %(backlog)s THEN (CASE WHEN mod(g, 4) = 0 THEN 'processing' ELSE 'received' END)
                        WHEN mod(g, 50) = 0 THEN 'ignored' WHEN mod(g, 997) = 0 THEN 'failed' ELSE 'done' END,
                   1, now() - make_interval(secs => g / 10.0), now() - make_interval(secs => g / 10.0),
                   now() - make_interval(secs => g / 10.0)
            FROM generate_series(1, %(n)s) g""", {"n": notifications, "backlog": backlog})
        timings["notifications"] = time.perf_counter() - started
        started = time.perf_counter()
        cur.execute("""
            INSERT INTO campaign_runs (notification_id, flow, campaign_id, channel_id, status, fetch_done,
                                       created_at, updated_at, finished_at)
            SELECT g, CASE WHEN mod(g, 4) = 0 THEN 'scheduled_send' ELSE 'scheduled_bonus' END, g / 3, 504 + mod(g, 3),
                   CASE WHEN g > 19960 THEN 'running' WHEN mod(g, 100) = 0 THEN 'failed' ELSE 'done' END, g <= 19960,
                   now() - make_interval(secs => (20000 - g) * 5.0), now() - make_interval(secs => (20000 - g) * 5.0),
                   CASE WHEN g > 19960 THEN NULL ELSE now() - make_interval(secs => (20000 - g) * 5.0) END
            FROM generate_series(1, 20000) g""")
        timings["campaign_runs"] = time.perf_counter() - started
        started = time.perf_counter()
        cur.execute("""
            INSERT INTO grants (campaign_id, customer_id, promo_code, channel_id, run_id, source, status, attempts,
                                reference, idempotency_key, scope)
            SELECT mod(g, 2000), 'C' || g, CASE WHEN mod(g, 2) = 0 THEN 'WB23' ELSE 'NV10' END, 504 + mod(g, 3),
                   1 + mod(g, 2000), 'scheduled_bonus',
                   CASE WHEN mod(g, 100) = 0 THEN 'rejected' WHEN mod(g, 1000) = 1 THEN 'failed' ELSE 'granted' END, 1,
                   'ref-' || g, 'relay-' || md5(g::text), 0
            FROM generate_series(1, %s) g""", (grants,))
        timings["grants"] = time.perf_counter() - started
    conn.commit()
    return timings


def scrape_round(client, scrapes: int) -> dict[str, float]:
    client.get("/metrics")  # opens the pooled connections; not counted
    times = []
    for _ in range(scrapes):
        started = time.perf_counter()
        response = client.get("/metrics")
        times.append((time.perf_counter() - started) * 1000)
        assert response.status_code == 200, response.status_code
    body = response.get_data(as_text=True)
    assert 'relay_metrics_source_up{source="postgres"} 1.0' in body, body[-2000:]
    return {"p50_ms": round(percentile(times, 50), 2), "p99_ms": round(percentile(times, 99), 2),
            "max_ms": round(max(times), 2), "scrapes": scrapes, "bytes": len(body)}


def old_group_by(conn, repeat: int = 5) -> float:
    """Median ms of the full-inbox GROUP BY the old `/metrics` ran on each scrape."""
    times = []
    with conn.cursor() as cur:
        for _ in range(repeat):
            started = time.perf_counter()
            cur.execute("SELECT event_type, status, count(*) FROM notifications GROUP BY 1, 2 ORDER BY 1, 2")
            cur.fetchall()
            times.append((time.perf_counter() - started) * 1000)
    conn.rollback()
    return round(percentile(times, 50), 1)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--database-url", default=os.environ.get("DATABASE_URL") or DEFAULT_DATABASE)
    parser.add_argument("--redis-url", default=os.environ.get("REDIS_URL") or DEFAULT_REDIS)
    parser.add_argument("--grants", type=int, default=1_000_000)
    parser.add_argument("--notifications", type=int, default=1_000_000)
    parser.add_argument("--scrapes", type=int, default=50)
    parser.add_argument("--backlog", type=int, default=200,
                        help="notifications still unfinished (3 in 4 received, 1 in 4 processing)")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    args = parser.parse_args()

    multiproc = tempfile.mkdtemp(prefix="relay-bench-metrics-")
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = multiproc  # as `relay web` runs: before any metric exists

    import psycopg2

    from shared.db import upgrade
    from shared.settings import Settings

    name = f"relay_bench_metrics_{uuid.uuid4().hex[:10]}"
    admin = psycopg2.connect(args.database_url)
    admin.autocommit = True
    with admin.cursor() as cur:
        cur.execute(f"CREATE DATABASE {name}")
    url = with_database(args.database_url, name)
    result: dict = {"database": name, "grants": args.grants, "notifications": args.notifications,
                    "backlog": args.backlog}
    try:
        upgrade(url)
        conn = psycopg2.connect(url)
        result["insert_seconds"] = {k: round(v, 1) for k, v in fill(conn, args.grants, args.notifications, args.backlog).items()}

        from web.app import create_app
        from web.listener import LISTENER_LATENCY, LISTENER_RESPONSES

        settings = Settings.from_env({"DATABASE_URL": url, "REDIS_URL": args.redis_url,
                                      "RELAY_LISTENER_TOKENS": TOKEN, "RELAY_LOG_LEVEL": "warning"})
        client = create_app(settings).test_client()
        for code in ("202", "200", "400", "401"):  # the web's own series, as a busy listener has them
            LISTENER_RESPONSES.labels(code=code).inc()
            LISTENER_LATENCY.observe(0.004)

        result["before_analyze"] = scrape_round(client, args.scrapes)
        with conn.cursor() as cur:
            conn.autocommit = True
            cur.execute("VACUUM ANALYZE")
            conn.autocommit = False
        result["after_analyze"] = scrape_round(client, args.scrapes)
        result["old_full_group_by_ms"] = old_group_by(conn)
        conn.close()
        client.application.extensions["relay"].engine.dispose()
    finally:
        with admin.cursor() as cur:
            cur.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
        admin.close()
        shutil.rmtree(multiproc, ignore_errors=True)
    worst = max(result["before_analyze"]["p99_ms"], result["after_analyze"]["p99_ms"])
    result["target_ms"] = TARGET_MS
    result["met"] = worst < TARGET_MS
    if args.json:
        print(json.dumps(result))
        return 0
    print(f"database {name} (dropped): {args.grants:,} grants, {args.notifications:,} notifications "
          f"({args.backlog:,} unfinished), 20,000 runs; "
          f"inserted in {sum(result['insert_seconds'].values()):.1f} s")
    for label in ("before_analyze", "after_analyze"):
        r = result[label]
        print(f"{label.replace('_', ' '):<15} {r['scrapes']} scrapes: p50 {r['p50_ms']:.2f} ms, p99 {r['p99_ms']:.2f} ms, "
              f"max {r['max_ms']:.2f} ms ({r['bytes']:,} bytes)")
    print(f"old /metrics query (full GROUP BY over the inbox), median of 5: {result['old_full_group_by_ms']} ms")
    print(f"target p99 < {TARGET_MS:g} ms: {'met' if result['met'] else 'NOT met'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
