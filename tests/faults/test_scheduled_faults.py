"""Flow 3 under fire: a worker SIGKILLed mid-run, a failing bonus system, dropped replies, 429 bursts.

Each test runs real `relay web` / `relay worker` (and `relay beat` where the sweeper is the
recovery path) against the simulator, then demands exact counts: every expected
(campaign, customer, promo) triple applied once at the fake bonus system, no duplicate grant,
and Postgres agreeing to the unit.
"""
from __future__ import annotations

import time

import pytest
import redis
import requests

from tests.conftest import count, poll
from tests.faults.support import (API_KEY, PAGES_FUNCTION, assert_exact, create_campaign, fire,
                                  optimove_stats, runs, start_web, wait_done)
from tests.harness import relay_env

pytestmark = pytest.mark.faults

# The Optimove limit is not under test here (test_rate_limit.py is); a generous one keeps runs short.
FAST_LIMIT = (1000, 10.0)


def _env(database_url, redis_url, sim, mode="batch", **extra):
    values = {"OPTIMOVE_API_URL": sim.optimove_url, "OPTIMOVE_API_KEY": API_KEY, "OPTIMOVE_RATE_LIMIT": "1000/10s",
              "BONUS_URL": sim.bonus_url if mode == "batch" else sim.bonus_single_url, "BONUS_MODE": mode}
    return relay_env(database_url, redis_url, **{**values, **extra})


def test_worker_sigkilled_mid_run_resumes_exactly(broker, procs, make_simulator, private_redis, database_url, db,
                                                  tmp_path, record_property):
    """SIGKILL the only worker (and its pool) while pages and grant batches are in flight; once per broker.

    Redis: its unacked messages stay invisible for the visibility timeout (and kombu only sweeps them
    back about every 100 s), so the beat sweeper must re-drive the stale runs and claimed grants from
    Postgres. RabbitMQ (a fresh vhost; the private Redis keeps the rate limiter): the broker puts them
    back in their queues as soon as the worker's connection drops, and the sweeper may re-drive the
    same work too. Either way the replayed bonus calls carry the same idempotency keys.
    """
    sim = make_simulator(rate_limit=FAST_LIMIT, latency_ms=150)
    env = _env(database_url, private_redis, sim, OPTIMOVE_PAGE_SIZE=200, BONUS_BATCH_SIZE=200, BROKER_URL=broker,
               RELAY_VISIBILITY_TIMEOUT=120, RELAY_SWEEP_AFTER=3, RELAY_SWEEP_INTERVAL=1)
    campaign = create_campaign(sim, 515151, customers_per_channel=3000)
    expected = len(campaign.triples)
    base = start_web(procs, env)
    procs.worker(env)
    procs.start("beat", ["beat", "--schedule-file", str(tmp_path / "beat")], env)

    started = time.monotonic()
    fire(base, campaign)
    poll(lambda: count(db, "SELECT count(*) FROM grants WHERE campaign_id = %s", campaign.id) >= expected // 4,
         40, message="a quarter of the grants claimed")
    if broker.kind == "amqp":  # RabbitMQ requeues them the moment the connection drops: count them before
        in_flight = sum(unacked for _, unacked in broker.server.queues(broker.vhost).values())
        procs.kill("worker")
        poll(lambda: sum(u for _, u in broker.server.queues(broker.vhost).values()) == 0, 15, 0.5,
             "RabbitMQ to requeue the killed worker's messages")
    else:
        procs.kill("worker")
        in_flight = redis.Redis.from_url(private_redis).hlen("unacked")
    assert in_flight > 0, "the killed worker held no unacknowledged task"
    claimed_at_kill = count(db, "SELECT count(*) FROM grants WHERE campaign_id = %s", campaign.id)
    granted_at_kill = count(db, "SELECT count(*) FROM grants WHERE campaign_id = %s AND status = 'granted'",
                            campaign.id)
    assert claimed_at_kill < expected, "the kill landed after every page was claimed; make the run longer"
    assert any(r["status"] == "running" for r in runs(db, campaign.id))

    replaced = time.monotonic()
    procs.worker(env, name="worker2")
    wait_done(db, campaign, 60)
    recovered = time.monotonic() - replaced
    summary = assert_exact(db, sim, campaign, record_property, recovered)
    print(f"\nkill with {in_flight} task(s) in flight, {expected} expected: claimed {claimed_at_kill}, granted "
          f"{granted_at_kill} at kill; done {recovered:.1f}s after the next worker started; "
          f"bonus calls {summary['calls']}, items sent {summary['items_received']}; "
          f"{time.monotonic() - started:.1f}s")


def test_bonus_system_failing_30_percent_of_calls(procs, make_simulator, redis_url, database_url, db,
                                                  record_property):
    """15 % of calls answer 503 and 15 % hang past the relay's 1 s timeout; every grant still lands once."""
    sim = make_simulator(rate_limit=FAST_LIMIT, failure_rate=0.15, timeout_rate=0.15, timeout_sleep_s=3)
    env = _env(database_url, redis_url, sim, OPTIMOVE_PAGE_SIZE=300, BONUS_BATCH_SIZE=100,
               BONUS_TIMEOUT=1, BONUS_MAX_ATTEMPTS=30)
    campaign = create_campaign(sim, 525252, customers_per_channel=1500)
    base = start_web(procs, env)
    procs.worker(env)

    started = time.monotonic()
    fire(base, campaign)
    wait_done(db, campaign, 60)
    summary = assert_exact(db, sim, campaign, record_property)
    assert summary["faults_injected"]["failure"] > 0 and summary["faults_injected"]["timeout"] > 0, summary
    print(f"\nbonus faults {summary['faults_injected']} over {summary['calls']} calls; "
          f"{time.monotonic() - started:.1f}s")


@pytest.mark.parametrize("mode", ["batch", "single"])
def test_grant_applied_then_connection_dropped(mode, procs, make_simulator, redis_url, database_url, db,
                                              tmp_path, record_property):
    """30 % of calls are applied and then the connection closes with no reply; the retry must not grant twice.

    In single mode some grant is dropped five or six times in a row, and capped exponential backoff
    (up to 30 s per retry) would make the test last a minute; beat runs with a short sweep age, so
    the sweeper re-drives waiting grants early, alongside their pending retry (both carry the same key).
    """
    sim = make_simulator(rate_limit=FAST_LIMIT, drop_after_apply_rate=0.3)
    env = _env(database_url, redis_url, sim, mode, OPTIMOVE_PAGE_SIZE=300, BONUS_BATCH_SIZE=100,
               BONUS_MAX_ATTEMPTS=30, RELAY_SWEEP_AFTER=3, RELAY_SWEEP_INTERVAL=1)
    size = 1500 if mode == "batch" else 300
    campaign = create_campaign(sim, 535353 if mode == "batch" else 545454, customers_per_channel=size)
    base = start_web(procs, env)
    procs.worker(env)
    procs.start("beat", ["beat", "--schedule-file", str(tmp_path / "beat")], env)

    started = time.monotonic()
    fire(base, campaign)
    wait_done(db, campaign, 60)
    summary = assert_exact(db, sim, campaign, record_property)
    assert summary["faults_injected"]["drop"] > 0, summary
    assert summary["items_received"] > summary["applied"], summary
    print(f"\n{mode}: {summary['faults_injected']['drop']} dropped replies over {summary['calls']} calls; "
          f"{time.monotonic() - started:.1f}s")


def test_optimove_429_bursts(procs, make_simulator, redis_url, database_url, db, record_property):
    """After every 5 accepted calls the fake Optimove answers 429 three times; paging backs off and completes."""
    sim = make_simulator(rate_limit=FAST_LIMIT)
    response = requests.post(f"{sim.optimove_url}/_sim/faults", json={"burst_429": {"every": 5, "length": 3}},
                             timeout=10)
    assert response.status_code == 200, response.text
    page_size = 100
    # the relay's own window is 1 s here, so a 429 without Retry-After waits 0.2-1 s (one window at most)
    env = _env(database_url, redis_url, sim, OPTIMOVE_PAGE_SIZE=page_size, OPTIMOVE_RATE_LIMIT="100/1s")
    campaign = create_campaign(sim, 565656, customers_per_channel=600)
    base = start_web(procs, env)
    procs.worker(env)

    started = time.monotonic()
    fire(base, campaign)
    wait_done(db, campaign, 90)
    assert_exact(db, sim, campaign, record_property)
    stats = optimove_stats(sim)
    assert stats["throttled"] > 0, stats
    assert stats["requests_by_function"] == {PAGES_FUNCTION: campaign.pages(page_size)}, stats
    print(f"\n429 bursts: {stats['throttled']} throttled, {stats['accepted']} accepted; "
          f"{time.monotonic() - started:.1f}s")
