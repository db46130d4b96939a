"""Guarantee 6: the Optimove rate limit holds across worker processes sharing one Redis limiter.

Four `relay worker` processes page one four-channel campaign through the fake Optimove at its
real limit (50 requests per 10 s). The fake counts every accepted request, so it can say exactly
how many ever fell in one window, how many it refused with 429, and the rate achieved.
"""
from __future__ import annotations

import time
from datetime import datetime

import pytest

from tests.faults.support import (API_KEY, PAGES_FUNCTION, assert_exact, create_campaign, fire, optimove_stats,
                                  start_web, wait_done)
from tests.harness import relay_env

pytestmark = pytest.mark.faults

LIMIT, WINDOW = 50, 10.0
PAGE_SIZE = 50


def test_four_workers_share_the_optimove_rate_limit(procs, make_simulator, redis_url, database_url, db,
                                                    record_property):
    sim = make_simulator(rate_limit=(LIMIT, WINDOW))
    env = relay_env(database_url, redis_url, OPTIMOVE_API_URL=sim.optimove_url, OPTIMOVE_API_KEY=API_KEY,
                    OPTIMOVE_RATE_LIMIT=f"{LIMIT}/{WINDOW:g}s", OPTIMOVE_PAGE_SIZE=PAGE_SIZE,
                    BONUS_URL=sim.bonus_url, BONUS_MODE="batch")
    campaign = create_campaign(sim, 575757, channels=(502, 504, 505, 506), customers_per_channel=2600,
                               overlap=0.0, codes=("WB23",), multi_code_every=0)
    pages = campaign.pages(PAGE_SIZE)
    assert pages == 4 * 53
    base = start_web(procs, env)
    for i in range(4):
        procs.worker(env, name=f"worker{i}", concurrency=2)

    started = time.monotonic()
    fire(base, campaign)
    wait_done(db, campaign, 90)
    elapsed = time.monotonic() - started
    assert_exact(db, sim, campaign, record_property)

    stats = optimove_stats(sim)
    span = (datetime.fromisoformat(stats["last_at"]) - datetime.fromisoformat(stats["first_at"])).total_seconds()
    achieved = stats["accepted"] / span
    print(f"\nrate limit: max_in_window {stats['max_in_window']} (limit {LIMIT}/{WINDOW:g}s), "
          f"accepted {stats['accepted']}, throttled {stats['throttled']}, "
          f"achieved {achieved:.2f} req/s over {span:.1f}s (target {LIMIT / WINDOW:g}); campaign {elapsed:.1f}s")
    assert stats["max_in_window"] <= LIMIT, stats
    assert stats["throttled"] == 0, stats
    assert stats["requests_by_function"] == {PAGES_FUNCTION: pages}, stats
    assert achieved >= 0.9 * LIMIT / WINDOW, stats
