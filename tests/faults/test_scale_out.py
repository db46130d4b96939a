"""Scale-out: three workers on three "machines" share one campaign; one machine dies mid-campaign.

Each worker is its own process group with its own Celery node name (`relay worker --hostname`),
as on separate hosts; they share only Postgres and Redis. One is SIGKILLed (with its pool) while
pages and grant batches are in flight. The campaign must finish with exact counts, and the
Optimove limit (enforced in Redis, shared by every worker) must hold across all three.
"""
from __future__ import annotations

import time

import pytest

from tests.conftest import count, poll
from tests.faults.support import API_KEY, assert_exact, create_campaign, fire, optimove_stats, start_web, wait_done
from tests.harness import relay_env

pytestmark = pytest.mark.faults

LIMIT, WINDOW = 50, 10.0
MACHINES = ("machine-a", "machine-b", "machine-c")


def test_three_worker_machines_one_killed_mid_campaign(procs, make_simulator, private_redis, database_url, db,
                                                       tmp_path, record_property):
    sim = make_simulator(rate_limit=(LIMIT, WINDOW), latency_ms=100)
    env = relay_env(database_url, private_redis, OPTIMOVE_API_URL=sim.optimove_url, OPTIMOVE_API_KEY=API_KEY,
                    OPTIMOVE_RATE_LIMIT=f"{LIMIT}/{WINDOW:g}s", OPTIMOVE_PAGE_SIZE=50, BONUS_URL=sim.bonus_url,
                    BONUS_MODE="batch", BONUS_BATCH_SIZE=50, RELAY_SWEEP_AFTER=3, RELAY_SWEEP_INTERVAL=1,
                    RELAY_VISIBILITY_TIMEOUT=120)
    campaign = create_campaign(sim, 656565, customers_per_channel=1200)
    expected = len(campaign.triples)
    base = start_web(procs, env)
    for machine in MACHINES:
        procs.start(machine, ["worker", "--concurrency", "2", "--hostname", f"{machine}@%h"], env)
    procs.start("beat", ["beat", "--schedule-file", str(tmp_path / "beat")], env)

    started = time.monotonic()
    fire(base, campaign)
    poll(lambda: count(db, "SELECT count(*) FROM grants WHERE campaign_id = %s", campaign.id) >= expected // 3,
         60, message="a third of the grants claimed")
    procs.kill("machine-b")  # the whole machine: worker and pool children at once
    at_kill, killed = count(db, "SELECT count(*) FROM grants WHERE campaign_id = %s", campaign.id), time.monotonic()
    assert at_kill < expected, "the kill landed after every page was claimed; make the campaign longer"
    wait_done(db, campaign, 120)
    summary = assert_exact(db, sim, campaign, record_property, time.monotonic() - killed)
    stats = optimove_stats(sim)
    logs = {machine: (tmp_path / f"{machine}.log").read_text(errors="replace") for machine in MACHINES}
    worked = {machine: log.count("succeeded") for machine, log in logs.items()}
    print(f"\nscale-out: {expected} grants, machine-b killed at {at_kill} claimed; tasks done per machine {worked}; "
          f"Optimove max in a window {stats['max_in_window']} (limit {LIMIT}/{WINDOW:g}s), throttled "
          f"{stats['throttled']}; bonus calls {summary['calls']}; {time.monotonic() - started:.1f}s")
    assert all(f"{machine}@" in logs[machine] for machine in MACHINES)  # each ran under its own node name
    assert all(worked[m] > 0 for m in MACHINES), worked  # every machine took part
    assert stats["max_in_window"] <= LIMIT, stats
    assert stats["throttled"] == 0, stats  # the fake refuses beyond its limit: no refusal = the limit held
