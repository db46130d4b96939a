"""Flow 4 and cancellation end to end: real web, worker and beat processes, real Postgres and Redis, the
simulator as Optimove (at its real rate limit, 50 requests per 10 s) and as the bonus system."""
from __future__ import annotations

import pytest

from simulator.conditional_driver import run_conditional
from tests.conftest import TOKEN, count
from tests.harness import relay_env

pytestmark = pytest.mark.e2e


def start(procs, simulator, database_url, redis_url, tmp_path, **extra) -> str:
    settings = dict(OPTIMOVE_API_URL=simulator.optimove_url, OPTIMOVE_API_KEY="sim-api-key-0123456789",
                    OPTIMOVE_RATE_LIMIT="50/10s", BONUS_URL=simulator.bonus_url,
                    BONUS_REVOKE_URL=simulator.bonus_revoke_url, BONUS_BATCH_SIZE=2000, RELAY_RELEASE_INTERVAL=1)
    env = relay_env(database_url, redis_url, **{**settings, **extra})
    base = procs.web(env)
    procs.worker(env, concurrency=2)
    procs.start("beat", ["beat", "--schedule-file", str(tmp_path / "beat-schedule")], env)
    return base


def test_fifty_thousand_customers_reported_before_a_deadline_60_s_away(procs, simulator, database_url, redis_url,
                                                                       db, tmp_path):
    base = start(procs, simulator, database_url, redis_url, tmp_path)
    summary = run_conditional(f"{base}/optimove/events?token={TOKEN}", simulator.optimove_url,
                              simulator.bonus_admin_url, customers=50_000, deadline_in=60, reject_every=25,
                              campaign_id=505050, timeout=10)
    print({k: summary[k] for k in ("approved_before_deadline", "reported_false", "report_calls",
                                   "max_report_call_size", "max_requests_in_window", "seconds")})
    assert summary["ok"], summary
    assert summary["approved_before_deadline"] == summary["expected_approved"] == 48_000
    assert summary["approved_after_deadline"] == 0 and summary["grants_after_deadline"] == 0
    assert summary["reported_false"] == 2_000 and summary["unreported"] == 0
    assert 0 < summary["max_report_call_size"] <= 10_000
    assert summary["max_requests_in_window"] <= summary["rate_limit"] == 50
    assert summary["duplicate_grants"] == 0
    with db.cursor() as cur:
        cur.execute("SELECT status, fetched, reported_true, reported_false, expired FROM campaign_runs "
                    "WHERE campaign_id = 505050")
        assert cur.fetchall() == [("done", 50_000, 48_000, 2_000, 0)]


def test_cancellation_mid_run_revokes_what_was_granted_once(procs, simulator, database_url, redis_url, db,
                                                            tmp_path):
    base = start(procs, simulator, database_url, redis_url, tmp_path, OPTIMOVE_PAGE_SIZE=2000, BONUS_BATCH_SIZE=500)
    summary = run_conditional(f"{base}/optimove/events?token={TOKEN}", simulator.optimove_url,
                              simulator.bonus_admin_url, customers=20_000, deadline_in=60, campaign_id=515253,
                              cancel_after=1.0, cancel_customers=0.5, timeout=5)
    assert summary["ok"], summary
    assert summary["cancelled"] == 10_000 and summary["double_revokes"] == 0
    assert summary["cancelled_not_revoked"] == 0 and summary["revoked_not_cancelled"] == 0
    assert count(db, "SELECT count(*) FROM grants WHERE campaign_id = 515253 AND status = 'claimed'") == 0
    assert count(db, "SELECT count(*) FROM revokes WHERE campaign_id = 515253 AND status <> 'revoked'") == 0
    assert count(db, "SELECT count(*) FROM revokes WHERE campaign_id = 515253") == summary["revoked"]
