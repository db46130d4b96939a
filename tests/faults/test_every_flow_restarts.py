"""Flows 1, 2, 4 and 5 while the workers and the stores are broken under them (flow 3 has the same faults
in test_store_restarts.py and test_scheduled_faults.py; flow 1's whole-worker SIGKILL is in
test_scheduled_send_faults.py). Each test starts its own relay processes, and its own Redis or Postgres
where it kills or restarts one:

- one prefork pool child of the worker SIGKILLed mid-task, the worker's main process living on;
- the whole worker (main process and pool, its process group) SIGKILLed mid-run, then a new worker;
- Redis SIGKILLed mid-run and started again on the same port, with its AOF and without any persistence
  (then every queued and unacknowledged message is gone: the beat sweeper and the Postgres cursor must
  recover everything acknowledged), the workers consuming again afterwards;
- Postgres restarted (fast shutdown) mid-batch;
- SIGTERM to the worker's main process mid-run, as a deploy does: its tasks finish or go back to the
  queue, and a new worker takes the rest.

"Mid-run" is once 30 % of the run's ledger rows are claimed (Postgres, polled), and each test asserts the
fault landed before the last. Flow 1 is a send campaign whose sends are partly due at once and partly
falling due over the next seconds; flows 2 and 5 a burst of EventTypeID 11 (a driver in a background
thread), the fault landing during the burst; flow 4 an EventTypeID 5 whose ClearanceRequiredBy is far
enough ahead for the recovery. Each ends with the invariants (`tests/faults/flows.py`): every expected
grant or send made exactly once at the fake peer (none lost, none twice), every acknowledged
notification `done`, `campaign_runs` counts equal to the truth (flows 1 and 4; the real-time flows open
no run), and for flow 4 nothing approved or granted after the deadline and nobody unreported.
"""
from __future__ import annotations

import signal
import time

import pytest

from cli.embedded import EmbeddedRedis, free_port
from tests.conftest import poll
from tests.faults.flows import FLOW_IDS, Scenario, freeze_holding_work, kill_child_mid_task, scenario
from tests.faults.support import own_postgres, restart_postgres

pytestmark = pytest.mark.faults

FLOWS = (1, 2, 4, 5)
MID_RUN = 0.3         # inject once this share of the run's ledger rows is claimed
DONE_WITHIN = 120.0   # s, generous: a loaded 2-core machine
REDIS_OUTAGE_S = 3.0


def _ids(flow: int) -> str:
    return FLOW_IDS[flow]


def _mid_run(sc: Scenario, db) -> None:
    poll(lambda: sc.progress(db) >= sc.total * MID_RUN, 60, 0.05, f"{MID_RUN:.0%} of the {sc.unit}")


def _landed(sc: Scenario, db) -> str:
    """What the run had done at the fault; fails if the fault came after the run had claimed everything."""
    done, at = sc.progress(db), sc.at_fault(db)
    assert done < sc.total, f"the fault landed after every ledger row was claimed ({at}); make the run longer"
    return at


def _finish(sc: Scenario, db, record_property, since: float, what: str) -> None:
    """Wait until the run is over; record what was lost and duplicated (also when it never ends), then assert
    the invariants; print the figures line."""
    try:
        sc.wait_done(db, DONE_WITHIN)
        unfinished = None
    except AssertionError as exc:
        unfinished = exc
    recovery = time.monotonic() - since
    measured = sc.measured(db)
    record_property("recovery_s", round(recovery, 1))
    record_property("lost", measured["lost"])
    record_property("duplicates", measured["duplicates"])
    if unfinished is not None:
        raise AssertionError(f"{unfinished}; measured at the peer: {measured}") from unfinished
    figures = sc.assert_exact(db, measured)
    print(f"\nflow {sc.flow} ({sc.title}): {what}; done {recovery:.1f}s later; lost {measured['lost']}, duplicates "
          f"{measured['duplicates']}; {figures}; {time.monotonic() - sc.started:.1f}s in all")


@pytest.mark.parametrize("flow", FLOWS, ids=_ids)
def test_pool_child_sigkilled_mid_task(flow, procs, make_simulator, private_redis, database_url, db, tmp_path,
                                       record_property):
    """One prefork pool child of the flow's worker (the real-time flows run their realtime worker as prefork 2
    here) SIGKILLed while it runs a task, as the OOM killer does: the children are frozen, the worker says
    which of them runs a task, that one is killed. The worker's main process lives on and forks a new child;
    Celery requeues the task's message (acks_late + reject_on_worker_lost), and what the task had claimed but
    not settled is re-driven by the beat sweeper, with the same idempotency keys."""
    sc = scenario(flow, make_simulator, tmp_path, 810000 + flow, pool_children=True)
    env = sc.env(database_url, private_redis)
    base = sc.start(procs, env)
    sc.begin(base)
    _mid_run(sc, db)
    worker = procs.procs["worker"]
    task, task_id, pid, tries = kill_child_mid_task(worker, private_redis)
    killed = time.monotonic()
    at = _landed(sc, db)
    log = tmp_path / "worker.log"

    def requeued():  # Celery reports the task lost and puts its message back: the same task id is received again
        _, lost, after = log.read_text(errors="replace").partition("WorkerLostError")
        return bool(lost) and f"[{task_id}] received" in after

    poll(requeued, 30, 0.1, f"the killed child's task {task_id} to be reported lost and received again")
    _finish(sc, db, record_property, killed, f"pool child {pid} SIGKILLed running {task} at {at} (try {tries}), "
                                             f"its message requeued")
    assert worker.poll() is None, "the worker's main process did not live on"


@pytest.mark.parametrize("flow", [2, 4, 5], ids=_ids)
def test_whole_worker_sigkilled_mid_run(flow, procs, make_simulator, private_redis, database_url, db, tmp_path,
                                        record_property):
    """SIGKILL the flow's worker, main process and pool together (its process group), frozen first until it
    holds an unacknowledged task, then start a new worker. Its messages stay invisible in Redis for the
    120 s visibility timeout, so the beat sweeper must re-drive from Postgres the unfinished notifications,
    runs and claimed ledger rows (the real-time flows: the notifications and grants or sends of the burst;
    flow 4: the paging run and its grants, and the customer statuses still to report)."""
    sc = scenario(flow, make_simulator, tmp_path, 820000 + flow)
    env = sc.env(database_url, private_redis)
    base = sc.start(procs, env)
    sc.begin(base)
    _mid_run(sc, db)
    held, freezes = freeze_holding_work(procs.procs["worker"], private_redis, sc.worker_queues)
    procs.kill("worker")
    at = _landed(sc, db)
    restarted = time.monotonic()
    sc.start_worker(procs, env, name="worker2")
    _finish(sc, db, record_property, restarted,
            f"worker SIGKILLed at {at} holding {dict(held)} (caught on freeze {freezes}), new worker started")


@pytest.mark.parametrize("appendonly", [True, False], ids=["aof", "no_persistence"])
@pytest.mark.parametrize("flow", FLOWS, ids=_ids)
def test_redis_killed_and_restarted_mid_run(flow, appendonly, procs, make_simulator, database_url, db, tmp_path,
                                            record_property):
    """SIGKILL the test's own Redis (broker and rate limiter) mid-run and start it again on the same port 3 s
    later, with its AOF (queued and unacknowledged messages survive, up to its last second) or without
    persistence (they are all gone). Meanwhile the listener keeps acknowledging what it has committed. The
    workers and beat must reconnect and consume again; the beat sweeper re-drives, from Postgres, every
    acknowledged notification never enqueued, the runs whose page task was lost (the cursor says where) and
    the ledger rows claimed but never delivered."""
    sc = scenario(flow, make_simulator, tmp_path, (830000 if appendonly else 840000) + flow)
    port = free_port()
    server = EmbeddedRedis(tmp_path / "redis", port=port, appendonly=appendonly)
    redis_url = server.start()
    try:
        env = sc.env(database_url, redis_url)
        base = sc.start(procs, env)
        sc.begin(base)
        _mid_run(sc, db)
        server.stop(signal.SIGKILL)
        at = _landed(sc, db)
        time.sleep(REDIS_OUTAGE_S)  # the outage itself (fault injection, not synchronisation)
        server = EmbeddedRedis(tmp_path / "redis", port=port, appendonly=appendonly)
        server.start()
        restarted = time.monotonic()
        _finish(sc, db, record_property, restarted,
                f"Redis ({'AOF' if appendonly else 'no persistence'}) SIGKILLed at {at}, back after "
                f"{REDIS_OUTAGE_S:g} s")
        dead = {name: p.returncode for name, p in procs.procs.items() if p.poll() is not None}
        assert not dead, f"relay processes exited during the Redis outage: {dead}"
    finally:
        procs.stop_all()
        server.stop()


@pytest.mark.parametrize("flow", FLOWS, ids=_ids)
def test_postgres_restarted_mid_batch(flow, procs, make_simulator, private_redis, tmp_path, record_property):
    """Restart the test's own Postgres (`pg_ctl restart -m fast`: every connection is cut) while pages and
    batches are in flight. Tasks that lose their connection replay or are re-driven by the sweeper; the
    listener answers 503 while Postgres is down (the real-time driver counts those triggers as refused, not
    acknowledged, so nothing is expected of them; one the listener committed as the server went down must
    still be processed exactly once)."""
    sc = scenario(flow, make_simulator, tmp_path, 850000 + flow)
    sc.refusals_allowed = True
    pg, url, db = own_postgres(tmp_path)
    try:
        env = sc.env(url, private_redis)
        base = sc.start(procs, env)
        sc.begin(base)
        _mid_run(sc, db)
        db, restarted = restart_postgres(pg, db)
        at = _landed(sc, db)
        _finish(sc, db, record_property, restarted, f"Postgres restarted at {at}")
    finally:
        db.close()
        procs.stop_all()
        pg.stop()


@pytest.mark.parametrize("flow", FLOWS, ids=_ids)
def test_worker_sigterm_mid_run_like_a_deploy(flow, procs, make_simulator, private_redis, database_url, db,
                                              tmp_path, record_property):
    """SIGTERM to the flow's worker main process only, as `docker stop` or a deploy does: Celery's warm
    shutdown lets the running tasks finish and gives back what it had prefetched; the test waits for it
    to exit, then a new worker takes the rest (the queued messages, and whatever the sweeper re-drives)."""
    sc = scenario(flow, make_simulator, tmp_path, 860000 + flow)
    env = sc.env(database_url, private_redis)
    base = sc.start(procs, env)
    sc.begin(base)
    _mid_run(sc, db)
    worker = procs.procs.pop("worker")
    worker.send_signal(signal.SIGTERM)
    worker.wait(60)  # the warm shutdown waits for the tasks it runs
    at = _landed(sc, db)
    restarted = time.monotonic()
    sc.start_worker(procs, env, name="worker2")
    _finish(sc, db, record_property, restarted,
            f"SIGTERM at {at} (worker exited {worker.returncode}), new worker started")
