"""Flow 3 while the stores and the workers are restarted under it (each test owns its servers).

- Redis SIGKILLed mid-campaign and started again on the same port, with its AOF and without any
  persistence (then every queued and unacknowledged message is gone: the beat sweeper and the
  Postgres cursor must recover everything acknowledged), and the workers consume again afterwards;
- Postgres restarted (fast shutdown) mid-batch;
- the worker sent SIGTERM mid-run, as a deploy does: its tasks finish or go back to the queue;
- one prefork pool child SIGKILLed mid-task while the worker lives on.

Each ends with the same invariants: every expected (campaign, customer, promo) triple granted
exactly once at the fake bonus system, every acknowledged notification processed, and
`campaign_runs` counts equal to the truth (`support.assert_exact`).
"""
from __future__ import annotations

import signal
import time

import pytest

from cli.embedded import EmbeddedRedis, free_port
from tests.conftest import count, poll
from tests.faults.support import (API_KEY, assert_exact, create_campaign, fire, own_postgres, restart_postgres,
                                  runs, start_web, wait_done)
from tests.harness import relay_env

pytestmark = pytest.mark.faults

FAST_LIMIT = (1000, 10.0)
RECOVERY = {"RELAY_SWEEP_AFTER": 3, "RELAY_SWEEP_INTERVAL": 1, "RELAY_VISIBILITY_TIMEOUT": 120}


def _env(database_url, redis_url, sim, **extra):
    return relay_env(database_url, redis_url, OPTIMOVE_API_URL=sim.optimove_url, OPTIMOVE_API_KEY=API_KEY,
                     OPTIMOVE_RATE_LIMIT="1000/10s", BONUS_URL=sim.bonus_url, BONUS_MODE="batch",
                     OPTIMOVE_PAGE_SIZE=200, BONUS_BATCH_SIZE=200, **{**RECOVERY, **extra})


def _start(procs, env, tmp_path):
    base = start_web(procs, env)
    procs.worker(env)
    procs.start("beat", ["beat", "--schedule-file", str(tmp_path / "beat")], env)
    return base


def _claimed(db, campaign) -> int:
    return count(db, "SELECT count(*) FROM grants WHERE campaign_id = %s", campaign.id)


@pytest.mark.parametrize("appendonly", [True, False], ids=["aof", "no_persistence"])
def test_redis_killed_and_restarted_mid_campaign(appendonly, procs, make_simulator, database_url, db, tmp_path,
                                                record_property):
    sim = make_simulator(rate_limit=FAST_LIMIT, latency_ms=150)
    port = free_port()
    server = EmbeddedRedis(tmp_path / "redis", port=port, appendonly=appendonly)
    redis_url = server.start()
    try:
        env = _env(database_url, redis_url, sim)
        campaign = create_campaign(sim, 616161 if appendonly else 626262, customers_per_channel=3000)
        expected = len(campaign.triples)
        base = _start(procs, env, tmp_path)
        started = time.monotonic()
        fire(base, campaign)
        poll(lambda: _claimed(db, campaign) >= expected // 4, 40, message="a quarter of the grants claimed")
        server.stop(signal.SIGKILL)  # queued and unacked messages: kept in the AOF, or gone
        claimed_at_kill = _claimed(db, campaign)
        assert claimed_at_kill < expected, "the kill landed after every page was claimed; make the run longer"
        time.sleep(3)  # the outage itself (fault injection, not synchronisation): the relay runs on without Redis
        server = EmbeddedRedis(tmp_path / "redis", port=port, appendonly=appendonly)
        server.start()
        restarted = time.monotonic()
        wait_done(db, campaign, 120)
        recovered = time.monotonic() - restarted
        summary = assert_exact(db, sim, campaign, record_property, recovered)
        print(f"\nRedis ({'AOF' if appendonly else 'no persistence'}) SIGKILLed at {claimed_at_kill} of "
              f"{expected} claimed, back after 3 s; done {recovered:.1f}s after the restart; bonus calls "
              f"{summary['calls']}, items {summary['items_received']}; {time.monotonic() - started:.1f}s in all")
    finally:
        server.stop()


def test_postgres_restarted_mid_batch(procs, make_simulator, redis_url, tmp_path, record_property):
    pg, url, db = own_postgres(tmp_path)
    try:
        sim = make_simulator(rate_limit=FAST_LIMIT, latency_ms=150)
        env = _env(url, redis_url, sim)
        campaign = create_campaign(sim, 636363, customers_per_channel=3000)
        expected = len(campaign.triples)
        base = _start(procs, env, tmp_path)
        started = time.monotonic()
        fire(base, campaign)
        poll(lambda: _claimed(db, campaign) >= expected // 4, 40, message="a quarter of the grants claimed")
        db, restarted = restart_postgres(pg, db)
        claimed_at_restart = _claimed(db, campaign)
        assert claimed_at_restart < expected, "the restart landed after every page was claimed"
        wait_done(db, campaign, 120)
        recovered = time.monotonic() - restarted
        summary = assert_exact(db, sim, campaign, record_property, recovered)
        print(f"\nPostgres restarted at {claimed_at_restart} of {expected} claimed; done "
              f"{recovered:.1f}s later; bonus calls {summary['calls']}, items "
              f"{summary['items_received']}; {time.monotonic() - started:.1f}s in all")
    finally:
        db.close()
        procs.stop_all()
        pg.stop()


def test_worker_sigterm_mid_run_like_a_deploy(procs, make_simulator, redis_url, database_url, db, tmp_path,
                                             record_property):
    """A warm shutdown: running tasks finish (or go back to the queue), the next worker takes the rest."""
    sim = make_simulator(rate_limit=FAST_LIMIT, latency_ms=300)
    env = _env(database_url, redis_url, sim)
    campaign = create_campaign(sim, 646464, customers_per_channel=3000)
    expected = len(campaign.triples)
    base = _start(procs, env, tmp_path)
    started = time.monotonic()
    fire(base, campaign)
    poll(lambda: _claimed(db, campaign) >= expected // 4, 40, message="a quarter of the grants claimed")
    worker = procs.procs.pop("worker")
    worker.send_signal(signal.SIGTERM)  # to the main process only, as `docker stop` or a deploy does
    worker.wait(60)  # Celery's warm shutdown waits for the tasks it runs
    stopped_at = _claimed(db, campaign)
    assert stopped_at < expected and any(r["status"] == "running" for r in runs(db, campaign.id))
    replaced = time.monotonic()
    procs.worker(env, name="worker2")
    wait_done(db, campaign, 90)
    recovered = time.monotonic() - replaced
    summary = assert_exact(db, sim, campaign, record_property, recovered)
    print(f"\nSIGTERM at {stopped_at} of {expected} claimed (worker exited {worker.returncode}); done "
          f"{recovered:.1f}s after the next worker started; bonus calls "
          f"{summary['calls']}, items {summary['items_received']}; {time.monotonic() - started:.1f}s in all")


def test_pool_child_sigkilled_mid_task(procs, make_simulator, redis_url, database_url, db, tmp_path, record_property):
    """One prefork pool child SIGKILLed while it runs a task (the worker's main process lives on)."""
    import psutil

    sim = make_simulator(rate_limit=FAST_LIMIT, latency_ms=300)
    env = _env(database_url, redis_url, sim)
    campaign = create_campaign(sim, 686868, customers_per_channel=3000)
    expected = len(campaign.triples)
    base = _start(procs, env, tmp_path)
    started = time.monotonic()
    fire(base, campaign)
    poll(lambda: _claimed(db, campaign) >= expected // 4, 40, message="a quarter of the grants claimed")
    children = psutil.Process(procs.procs["worker"].pid).children()
    busy = max(children, key=lambda p: p.cpu_times().user + p.cpu_times().system)
    busy.kill()  # mid-task: Celery requeues its message (task_reject_on_worker_lost) and forks a new child
    at_kill, killed = _claimed(db, campaign), time.monotonic()
    wait_done(db, campaign, 90)
    recovered = time.monotonic() - killed
    summary = assert_exact(db, sim, campaign, record_property, recovered)
    assert procs.procs["worker"].poll() is None  # the worker itself carried on
    print(f"\npool child {busy.pid} SIGKILLed at {at_kill} of {expected} claimed; done {recovered:.1f}s later; bonus calls {summary['calls']}, "
          f"items {summary['items_received']}; {time.monotonic() - started:.1f}s in all")
