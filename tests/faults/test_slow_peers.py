"""Flow 3 against slow and bursty peers: every grant still lands exactly once.

- the bonus system answering in 2 s per call, and failing every call for a burst of 6 s mid-campaign;
- the Optimove API answering 429 and 500 in bursts while the campaign pages.
"""
from __future__ import annotations

import time

import pytest
import requests

from tests.conftest import count, poll
from tests.faults.support import API_KEY, assert_exact, create_campaign, fire, optimove_stats, start_web, wait_done
from tests.harness import relay_env

pytestmark = pytest.mark.faults


def _env(database_url, redis_url, sim, **extra):
    return relay_env(database_url, redis_url, OPTIMOVE_API_URL=sim.optimove_url, OPTIMOVE_API_KEY=API_KEY,
                     OPTIMOVE_RATE_LIMIT="100/1s", BONUS_URL=sim.bonus_url, BONUS_MODE="batch", **extra)


def test_bonus_system_2s_per_call_and_a_6s_burst_of_failures(procs, make_simulator, redis_url, database_url, db,
                                                             record_property):
    """Every bonus call takes 2 s; 6 s into the campaign every call fails (503) for 6 s, then recovers."""
    sim = make_simulator(rate_limit=(1000, 10.0), latency_ms=2000)
    env = _env(database_url, redis_url, sim, OPTIMOVE_PAGE_SIZE=200, BONUS_BATCH_SIZE=100, BONUS_TIMEOUT=5)
    campaign = create_campaign(sim, 666666, customers_per_channel=400)
    expected = len(campaign.triples)
    base = start_web(procs, env)
    procs.worker(env, concurrency=4)
    config = f"{sim.bonus_admin_url}/_sim/config"

    started = time.monotonic()
    fire(base, campaign)
    poll(lambda: count(db, "SELECT count(*) FROM grants WHERE campaign_id = %s AND status = 'granted'",
                       campaign.id) > 0, 30, message="the first grants recorded")
    assert requests.post(config, json={"failure_rate": 1.0}, timeout=10).status_code == 200
    burst_started = time.monotonic()
    granted_at_burst = count(db, "SELECT count(*) FROM grants WHERE campaign_id = %s AND status = 'granted'",
                             campaign.id)
    assert granted_at_burst < expected, "the campaign ended before the burst; make it longer"
    time.sleep(6)  # the burst itself (fault injection, not synchronisation)
    assert requests.post(config, json={"failure_rate": 0.0}, timeout=10).status_code == 200
    ended = time.monotonic()
    wait_done(db, campaign, 120)
    summary = assert_exact(db, sim, campaign, record_property, time.monotonic() - ended)
    print(f"\n2 s per bonus call, every call failing for {ended - burst_started:.0f} s at {granted_at_burst} of "
          f"{expected} granted; done {time.monotonic() - ended:.1f}s after the burst; calls {summary['calls']}, "
          f"items {summary['items_received']}, faults {summary['faults_injected']}; "
          f"{time.monotonic() - started:.1f}s in all")
    assert summary["faults_injected"]["failure"] > 0, summary


def test_optimove_429_and_500_in_bursts(procs, make_simulator, redis_url, database_url, db, record_property):
    """After every 4 accepted calls Optimove answers 429 twice, and 30 % of customer-list calls answer 500."""
    sim = make_simulator(rate_limit=(1000, 10.0))
    response = requests.post(f"{sim.optimove_url}/_sim/faults",
                             json={"burst_429": {"every": 4, "length": 2}, "error_rate": 0.3, "seed": 11},
                             timeout=10)
    assert response.status_code == 200, response.text
    env = _env(database_url, redis_url, sim, OPTIMOVE_PAGE_SIZE=100, BONUS_BATCH_SIZE=100,
               OPTIMOVE_MAX_ATTEMPTS=20)
    campaign = create_campaign(sim, 676767, customers_per_channel=600)
    base = start_web(procs, env)
    procs.worker(env)

    started = time.monotonic()
    fire(base, campaign)
    wait_done(db, campaign, 120)
    summary = assert_exact(db, sim, campaign, record_property)
    stats = optimove_stats(sim)
    print(f"\nOptimove: {stats['throttled']} answered 429, {stats['injected_errors']} answered 500, "
          f"{stats['accepted']} accepted; bonus calls {summary['calls']}; {time.monotonic() - started:.1f}s")
    assert stats["throttled"] > 0 and stats["injected_errors"] > 0, stats
