"""Paging, claiming, granting and sweeping on real Postgres, with hand-written fakes for the peers.

Domain functions are called directly (STYLE lesson 9): what they return is what the task layer
would enqueue after commit.
"""
from __future__ import annotations

import pytest

from shared import dispatch, repository as repo
from shared.adapters.bonus import FakeBonusAdapter, idempotency_key
from shared.db import unit_of_work
from shared.flows import inbox, paging, sweeper
from shared.flows.grants import GRANTS
from shared.flows.ledger import Scope
from shared.flows.routing import FLOWS
from shared.flows.sends import SENDS
from shared.optimove.client import PermanentError, RateLimited, TemporaryError, Throttled
from shared.runtime import Runtime
from shared.schemas import parse_notification
from tests.conftest import count, make_settings

pytestmark = pytest.mark.integration


class FakeOptimove:
    """Pages of GetCustomerExecutionDetailsByCampaign per channel, with scripted errors."""

    def __init__(self, channels: dict[int, list[dict]]):
        self.channels = channels
        self.calls: list[tuple[int, int, int]] = []
        self.errors: list[Exception] = []

    def fetch_page(self, category, function, params, skip, top):
        assert (category, function) == ("customers", "GetCustomerExecutionDetailsByCampaign")
        if self.errors:
            raise self.errors.pop(0)
        self.calls.append((params["ChannelID"], skip, top))
        return self.channels.get(params["ChannelID"], [])[skip:skip + top]


def rows(start: int, n: int, codes: str = "WB23") -> list[dict]:
    return [{"CustomerID": f"C{i}", "ChannelID": 1, "PromoCode": codes, "ScheduleTime": "2026-11-27 10:00"}
            for i in range(start, start + n)]


@pytest.fixture
def rt(database_url, redis_url, db):
    runtime = Runtime(make_settings(DATABASE_URL=database_url, REDIS_URL=redis_url, OPTIMOVE_PAGE_SIZE=4,
                                    BONUS_BATCH_SIZE=3, BONUS_MAX_ATTEMPTS=3, OPTIMOVE_MAX_ATTEMPTS=3,
                                    RELAY_SWEEP_AFTER=1))
    runtime.__dict__["optimove"] = FakeOptimove({504: rows(0, 10, "WB23,NV10"), 505: rows(5, 10)})
    runtime.__dict__["bonus"] = FakeBonusAdapter()
    yield runtime
    runtime.engine.dispose()


def notify(rt, campaign: int, channel: int) -> int:
    n = parse_notification({"EventTypeID": 13, "CampaignID": campaign, "ChannelID": channel})
    with unit_of_work(rt.engine) as conn:
        return repo.insert_notification(conn, n, "{}")[0]


def page(rt, run_id: int) -> list:
    """The page task of a run, as the worker runs it."""
    return paging.fetch_next_page(rt, run_id, FLOWS)


TASKS = {dispatch.PROCESS_NOTIFICATION: inbox.process_notification, dispatch.FETCH_PAGE: page,
         dispatch.GRANT_BATCH: GRANTS.deliver, dispatch.SEND_BATCH: SENDS.deliver}


def drain(rt, items: list) -> list:
    """Run every follow-up (ignoring countdowns) until nothing is left; return what was run."""
    done, queue = [], list(items)
    while queue:
        item = queue.pop(0)
        done.append(item)
        queue.extend(TASKS[item.task](rt, *item.args))
    return done


def test_two_channels_overlap_granted_once(rt, db):
    first = notify(rt, 7, 504)
    second = notify(rt, 7, 505)
    drain(rt, inbox.process_notification(rt, second) + inbox.process_notification(rt, first))
    # 504: C0..C9 with two codes; 505: C5..C14 with WB23 -> C5..C9 WB23 overlap
    expected = {(f"C{i}", c) for i in range(10) for c in ("WB23", "NV10")} | {(f"C{i}", "WB23") for i in range(10, 15)}
    applied = {(i.customer_id, i.promo_code) for i in rt.bonus.applied.values()}
    assert applied == expected
    assert sum(len(c) for c in rt.bonus.calls) == len(expected)
    assert count(db, "SELECT count(*) FROM grants WHERE status = 'granted'") == len(expected)
    assert count(db, "SELECT count(*) FROM campaign_runs WHERE status = 'done'") == 2
    assert count(db, "SELECT sum(duplicates_skipped) FROM campaign_runs") == 5
    assert count(db, "SELECT sum(claimed) FROM campaign_runs") == len(expected)
    assert count(db, "SELECT sum(granted) FROM campaign_runs") == len(expected)
    assert count(db, "SELECT count(*) FROM notifications WHERE status = 'done'") == 2


def test_replayed_notification_and_pages_do_nothing_twice(rt, db):
    nid = notify(rt, 8, 505)
    follow = inbox.process_notification(rt, nid)
    assert inbox.process_notification(rt, nid) == []  # already done
    run_id = follow[0].args[0]
    first_page = page(rt, run_id)
    # the same page task delivered twice: the second sees the cursor moved and re-fetches the *next* page only
    assert count(db, "SELECT cursor FROM campaign_runs WHERE id = %s", run_id) == 4
    drain(rt, first_page + page(rt, run_id))
    assert count(db, "SELECT count(*) FROM grants") == 10
    with db.cursor() as cur:
        cur.execute("SELECT id FROM grants")
        grant_ids = [r[0] for r in cur.fetchall()]
    assert GRANTS.deliver(rt, run_id, grant_ids) == []  # all settled: a replayed batch sends nothing
    assert sum(len(c) for c in rt.bonus.calls) == 10
    assert count(db, "SELECT granted FROM campaign_runs WHERE id = %s", run_id) == 10


def test_page_taken_by_another_task_is_dropped(rt, db):
    nid = notify(rt, 9, 505)
    run_id = inbox.process_notification(rt, nid)[0].args[0]
    with unit_of_work(rt.engine) as conn:
        run = repo.get_run(conn, run_id)
    pages = FLOWS[run["flow"]].pages
    rows = rt.optimove.fetch_page(pages.category, pages.function, pages.params(run, rt.settings), skip=0, top=4)
    page(rt, run_id)  # another task wins the page at cursor 0
    assert paging.claim_page(rt, run, pages, 0, 4, rows) == []
    assert count(db, "SELECT count(*) FROM grants") == 4
    assert count(db, "SELECT pages_fetched FROM campaign_runs WHERE id = %s", run_id) == 1


def test_rate_limited_page_reschedules_for_the_wait(rt, db):
    run_id = inbox.process_notification(rt, notify(rt, 10, 505))[0].args[0]
    rt.optimove.errors.append(RateLimited(2.5))
    assert page(rt, run_id) == [dispatch.fetch_page(run_id, countdown=2.5)]
    assert count(db, "SELECT attempts FROM campaign_runs WHERE id = %s", run_id) == 0


def test_temporary_errors_retry_then_park_the_run(rt, db):
    run_id = inbox.process_notification(rt, notify(rt, 11, 505))[0].args[0]
    rt.optimove.errors.extend([TemporaryError("503 from Optimove", retry_after=4.0)] * 3)
    follow = page(rt, run_id)
    assert follow[0].task == dispatch.FETCH_PAGE and 4.0 <= follow[0].countdown <= 30
    assert page(rt, run_id)[0].task == dispatch.FETCH_PAGE
    assert page(rt, run_id) == []
    with unit_of_work(rt.engine) as conn:
        run = repo.get_run(conn, run_id)
    assert run["status"] == "failed" and "gave up after 3 attempts: 503 from Optimove" in run["last_error"]
    runs, rows, follow = sweeper.redrive_campaign(rt, 11)
    assert (runs, rows) == (1, {"grants": 0, "sends": 0, "revokes": 0}) and follow == [dispatch.fetch_page(run_id)]
    drain(rt, follow)
    assert count(db, "SELECT count(*) FROM campaign_runs WHERE id = %s AND status = 'done'", run_id) == 1
    assert count(db, "SELECT count(*) FROM grants WHERE campaign_id = 11 AND status = 'granted'") == 10


def test_optimove_429_waits_within_a_window_and_counts_no_attempt(rt, db):
    run_id = inbox.process_notification(rt, notify(rt, 20, 505))[0].args[0]
    rt.optimove.errors.extend([Throttled("GET x: HTTP 429: Too Many Requests")] * 5)
    for _ in range(5):
        follow = page(rt, run_id)
        assert follow[0].task == dispatch.FETCH_PAGE and 0 < follow[0].countdown <= 10
    with unit_of_work(rt.engine) as conn:
        run = repo.get_run(conn, run_id)
    assert run["status"] == "running" and run["attempts"] == 0 and "429" in run["last_error"]
    drain(rt, follow)
    assert count(db, "SELECT count(*) FROM campaign_runs WHERE id = %s AND status = 'done'", run_id) == 1


def test_permanent_error_parks_the_run_with_reason(rt, db):
    run_id = inbox.process_notification(rt, notify(rt, 12, 505))[0].args[0]
    rt.optimove.errors.append(PermanentError("401 Unauthorized: \"Unauthorized\"", 401))
    assert page(rt, run_id) == []
    with unit_of_work(rt.engine) as conn:
        run = repo.get_run(conn, run_id)
    assert run["status"] == "failed" and "401" in run["last_error"]


def test_grant_retries_rejections_and_failures_recorded(rt, db):
    rt.bonus.reject_code("NV10", "player self-excluded")
    run_id = inbox.process_notification(rt, notify(rt, 13, 504))[0].args[0]
    follow = page(rt, run_id)  # C0..C3, 8 pairs -> batches of 3
    batches = [f for f in follow if f.task == dispatch.GRANT_BATCH]
    rt.bonus.queue("retry", "retry", "retry")  # the first batch is answered "retry" three times in a row
    first = batches[0]
    retry = GRANTS.deliver(rt, *first.args)
    assert retry and retry[0].countdown <= 30
    rt.bonus.queue("retry", "retry", "retry")
    retry = GRANTS.deliver(rt, *retry[0].args)
    rt.bonus.queue("retry", "retry", "retry")
    assert GRANTS.deliver(rt, *retry[0].args) == []  # third attempt: failed
    with db.cursor() as cur:
        cur.execute("SELECT status, attempts, reason FROM grants WHERE id = ANY(%s)", (first.args[1],))
        assert {(s, a) for s, a, _ in cur.fetchall()} == {("failed", 3)}
    for batch in batches[1:]:
        drain(rt, [batch])
    assert count(db, "SELECT count(*) FROM grants WHERE status = 'rejected' AND reason = 'player self-excluded'") > 0
    assert count(db, "SELECT failed FROM campaign_runs WHERE id = %s", run_id) == 3

    with unit_of_work(rt.engine) as conn:
        redriven = repo.redrive_failed(conn, repo.GRANTS, 13)
    assert len(redriven) == 3
    drain(rt, GRANTS.deliveries(redriven, rt.settings))
    assert count(db, "SELECT count(*) FROM grants WHERE status = 'failed'") == 0
    keys = [idempotency_key(13, "C0", "WB23")] * 2
    assert keys[0] == keys[1] and keys[0] in {k for c in rt.bonus.calls for k in (i.idempotency_key for i in c)}


def test_adapter_exception_keeps_the_batch(rt, db):
    class Broken(FakeBonusAdapter):
        def grant(self, items):
            raise RuntimeError("bonus adapter bug")

    rt.__dict__["bonus"] = Broken()
    run_id = inbox.process_notification(rt, notify(rt, 14, 505))[0].args[0]
    batch = next(f for f in page(rt, run_id) if f.task == dispatch.GRANT_BATCH)
    retry = GRANTS.deliver(rt, *batch.args)
    assert retry and retry[0].args[1] == batch.args[1]
    with db.cursor() as cur:
        cur.execute("SELECT DISTINCT status, reason FROM grants WHERE id = ANY(%s)", (batch.args[1],))
        assert cur.fetchall() == [("claimed", "adapter error: RuntimeError: bonus adapter bug")]


def test_sweeper_redrives_lost_work(rt, db):
    nid = notify(rt, 15, 505)            # never enqueued
    nid2 = notify(rt, 16, 505)
    run_id = inbox.process_notification(rt, nid2)[0].args[0]  # its page task lost
    nid3 = notify(rt, 17, 505)
    run3 = inbox.process_notification(rt, nid3)[0].args[0]
    lost_batches = page(rt, run3)  # its grant batches lost
    with db.cursor() as cur:
        cur.execute("UPDATE notifications SET updated_at = now() - interval '1 hour'")
        cur.execute("UPDATE campaign_runs SET updated_at = now() - interval '1 hour'")
        cur.execute("UPDATE grants SET updated_at = now() - interval '1 hour'")
    swept = sweeper.sweep(rt)
    assert dispatch.process_notification(nid, 13) in swept
    assert dispatch.fetch_page(run_id) in swept and dispatch.fetch_page(run3) in swept
    claimed = sorted(g for b in lost_batches if b.task == dispatch.GRANT_BATCH for g in b.args[1])
    assert sorted(g for s in swept if s.task == dispatch.GRANT_BATCH for g in s.args[1]) == claimed
    assert sweeper.sweep(rt) == []  # the clocks were reset: one sweep takes each
    drain(rt, swept)
    assert count(db, "SELECT count(*) FROM campaign_runs WHERE status = 'done'") == 3
    assert count(db, "SELECT count(*) FROM grants WHERE status = 'granted'") == 30


def test_poison_notification_parked_after_max_attempts(rt, db):
    nid = notify(rt, 18, 505)
    with db.cursor() as cur:
        cur.execute("UPDATE notifications SET attempts = %s WHERE id = %s", (rt.settings.max_attempts, nid))
    assert inbox.process_notification(rt, nid) == []
    with db.cursor() as cur:
        cur.execute("SELECT status, last_error FROM notifications WHERE id = %s", (nid,))
        assert cur.fetchone() == ("failed", f"gave up after {rt.settings.max_attempts} attempts")


def test_unbuilt_event_types_ignored_with_reason(database_url, redis_url, db, tmp_path):
    rt = Runtime(make_settings(DATABASE_URL=database_url, REDIS_URL=redis_url))
    n = parse_notification({"EventTypeID": 1, "TimeStamp": "2026-11-27 10:00", "CampaignID": 1})
    with unit_of_work(rt.engine) as conn:
        nid1 = repo.insert_notification(conn, n, "{}")[0]
    inbox.process_notification(rt, nid1)
    with db.cursor() as cur:
        cur.execute("SELECT id, status, last_error FROM notifications ORDER BY id")
        assert cur.fetchall() == [(nid1, "ignored", "no flow handles EventTypeID 1")]
    rt.engine.dispose()


def test_concurrent_overlapping_claims_neither_deadlock_nor_double_claim(rt, db):
    import threading

    pairs = [(f"C{i:05d}", "WB23") for i in range(20000)]
    results: dict[str, list[int]] = {}
    errors: list[Exception] = []
    barrier = threading.Barrier(2)

    def claim(name: str, ordered: list) -> None:
        try:
            with unit_of_work(rt.engine) as conn:
                barrier.wait()
                results[name] = GRANTS.claim(conn, Scope(21, None, "test"), ordered)
        except Exception as exc:  # a deadlock would surface here
            errors.append(exc)

    threads = [threading.Thread(target=claim, args=("a", pairs)),
               threading.Thread(target=claim, args=("b", pairs[::-1]))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    assert not set(results["a"]) & set(results["b"])
    assert len(results["a"]) + len(results["b"]) == len(pairs)
    assert count(db, "SELECT count(*) FROM grants WHERE campaign_id = 21") == len(pairs)


class WorkerDied(BaseException):
    """Stands for a worker process dying inside the flow (SIGKILL, OOM): nothing after it runs."""


@pytest.mark.parametrize("crash", [RuntimeError("poison"), WorkerDied()], ids=["raises", "worker_dies"])
def test_a_notification_that_crashes_its_flow_every_time_is_parked_and_others_go_on(rt, db, monkeypatch, crash):
    """The attempt is committed before the flow runs, so a crash that rolls the flow back still counts:
    bounded attempts, then `failed` with a reason. (It used to be counted inside the flow's transaction,
    so a poison notification was retried forever.)"""
    import dataclasses

    from shared.flows.routing import ROUTER

    poison, healthy = notify(rt, 31, 504), notify(rt, 32, 505)
    real_flow_for = ROUTER.flow_for

    def flow_for(route):
        flow = real_flow_for(route)

        def start(runtime, conn, row):
            if row["id"] == poison:
                raise crash
            return flow.start(runtime, conn, row)

        return dataclasses.replace(flow, start=start) if flow is not None else None

    monkeypatch.setattr(ROUTER, "flow_for", flow_for)
    deliveries = 0
    while True:  # what the worker and the broker do: run, and run again what comes back or was lost
        deliveries += 1
        assert deliveries <= rt.settings.max_attempts + 1, "the poison notification was never parked"
        try:
            follow_ups = inbox.process_notification(rt, poison)
        except WorkerDied:  # the broker redelivers the unacknowledged task
            continue
        if not follow_ups:
            break
        assert [f.task for f in follow_ups] == [dispatch.PROCESS_NOTIFICATION]
    with db.cursor() as cur:
        cur.execute("SELECT status, attempts, last_error FROM notifications WHERE id = %s", (poison,))
        status, attempts, error = cur.fetchone()
    assert status == "failed" and attempts == rt.settings.max_attempts + 1
    # the reason names the error the flow raised; a worker that died in it left none
    assert error == f"gave up after {rt.settings.max_attempts} attempts" + (
        ": RuntimeError: poison" if isinstance(crash, RuntimeError) else "")
    assert deliveries == rt.settings.max_attempts + 1
    drain(rt, inbox.process_notification(rt, healthy))  # other work is unaffected
    with db.cursor() as cur:
        cur.execute("SELECT status FROM notifications WHERE id = %s", (healthy,))
        assert cur.fetchone() == ("done",)
    assert count(db, "SELECT count(*) FROM campaign_runs WHERE status = 'done'") == 1
