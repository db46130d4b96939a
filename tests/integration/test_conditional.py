"""Flow 4, conditional execution, on real Postgres: paging GetProcessedCampaignCustomers, grants with the
campaign key, customer statuses reported in chunks before the deadline, nothing granted after it, and
the run's end at its deadline. Peers are hand-written fakes; the deadline is moved instead of the clock
(`shift_deadline`), which is the same to a run judged by Postgres' clock."""
from __future__ import annotations

from datetime import datetime, timedelta, timezone

import pytest

from shared import dispatch, repository as repo
from shared.adapters.bonus import FakeBonusAdapter
from shared.db import unit_of_work
from shared.flows import conditional, inbox, paging, runs, sweeper
from shared.flows.grants import GRANTS
from shared.flows.routing import FLOWS
from shared.optimove.client import TemporaryError
from shared.runtime import Runtime
from shared.schemas import parse_notification
from tests.conftest import count, make_settings

pytestmark = pytest.mark.integration

CAMPAIGN = 5151


class FakeOptimove:
    """GetProcessedCampaignCustomers and GetCustomerExecutionDetailsByCampaign pages; posts recorded."""

    def __init__(self):
        self.processed: list[dict] = []
        self.executions: dict[int, list[dict]] = {}
        self.fetches: list[int] = []
        self.reports: list[dict] = []
        self.priorities: list[bool] = []
        self.post_errors: list[Exception] = []

    def fetch_page(self, category, function, params, skip, top):
        self.fetches.append(skip)
        if function == "GetProcessedCampaignCustomers":
            assert params == {"CampaignID": CAMPAIGN}
            return self.processed[skip:skip + top]
        return self.executions.get(params["ChannelID"], [])[skip:skip + top]

    def post(self, category, function, body, params=None, priority=False):
        assert (category, function) == ("integrations", "UpdateCustomerPromotionStatus")
        if self.post_errors:
            raise self.post_errors.pop(0)
        self.reports.append(body)
        self.priorities.append(priority)


def customers(n: int, start: int = 0) -> list[dict]:
    """Every 3rd customer holds two codes, as a list or a comma-separated string."""
    return [{"CustomerID": f"K{i}", "PromoCode": ("WB23,NV10" if i % 2 else ["WB23", "NV10"]) if i % 3 == 0
             else "WB23"} for i in range(start, start + n)]


@pytest.fixture
def make_rt(database_url, redis_url, db):
    made = []

    def factory(**overrides):
        settings = dict(DATABASE_URL=database_url, REDIS_URL=redis_url, OPTIMOVE_PAGE_SIZE=4, BONUS_BATCH_SIZE=3,
                        BONUS_MAX_ATTEMPTS=3, BONUS_TIMEOUT=2, OPTIMOVE_RATE_LIMIT="50/10s", RELAY_SWEEP_AFTER=1)
        rt = Runtime(make_settings(**{**settings, **overrides}))
        rt.__dict__["optimove"] = FakeOptimove()
        rt.__dict__["bonus"] = FakeBonusAdapter()
        made.append(rt)
        return rt

    yield factory
    for rt in made:
        rt.engine.dispose()


@pytest.fixture
def rt(make_rt):
    return make_rt()


def clearance(rt, deadline: datetime, stamp: str = "2026-11-28 10:00:00") -> int:
    body = {"EventTypeID": 5, "TimeStamp": stamp, "CampaignID": CAMPAIGN,
            "ClearanceRequiredBy": deadline.astimezone(timezone.utc).strftime("%Y-%m-%d %H:%M:%S")}
    n = parse_notification(body)
    import json
    with unit_of_work(rt.engine) as conn:
        return repo.insert_notification(conn, n, json.dumps(body))[0]


TASKS = {dispatch.PROCESS_NOTIFICATION: inbox.process_notification,
         dispatch.FETCH_PAGE: lambda rt, run_id: paging.fetch_next_page(rt, run_id, FLOWS),
         dispatch.GRANT_BATCH: GRANTS.deliver, dispatch.REPORT_STATUSES: conditional.report_statuses}


def drain(rt, items: list, skip: set = frozenset()) -> list:
    """Run every follow-up (ignoring countdowns) until nothing is left; tasks named in `skip` are returned
    unrun."""
    held, queue = [], list(items)
    while queue:
        item = queue.pop(0)
        if item.task in skip:
            held.append(item)
            continue
        queue.extend(TASKS[item.task](rt, *item.args))
    return held


def shift_deadline(db, seconds_from_now: float) -> None:
    with db.cursor() as cur:
        cur.execute("UPDATE campaign_runs SET deadline = now() + make_interval(secs => %s) WHERE deadline IS NOT NULL",
                    (seconds_from_now,))


def reported(rt) -> dict[str, bool]:
    out = {}
    for body in rt.optimove.reports:
        out.update({p["CustomerID"]: p["Status"] for p in body["PromosUpdated"]})
    return out


def run_row(db) -> tuple:
    with db.cursor() as cur:
        cur.execute("SELECT status, fetched, claimed, granted, rejected, expired, reported_true, reported_false "
                    "FROM campaign_runs WHERE flow = 'conditional'")
        return cur.fetchone()


def test_customers_granted_and_reported_before_the_deadline(rt, db):
    rt.optimove.processed = customers(10)
    rt.bonus.reject("NV10", "no such promotion")  # every customer holding NV10 is reported false
    nid = clearance(rt, datetime.now(timezone.utc) + timedelta(minutes=5))
    drain(rt, inbox.process_notification(rt, nid))
    assert rt.optimove.reports == []  # statuses wait for the tick (or a full chunk)
    drain(rt, sweeper.release_due(rt))
    expected = {f"K{i}": i % 3 != 0 for i in range(10)}
    assert reported(rt) == expected
    assert all(rt.optimove.priorities), "status reports must take the priority slot"
    body = rt.optimove.reports[0]
    assert body["CampaignID"] == CAMPAIGN and len(body["TimeStamp"]) == 19
    assert sorted(i.promo_code for i in rt.bonus.applied.values()).count("WB23") == 10
    assert {i.source for i in rt.bonus.applied.values()} == {"conditional"}
    assert run_row(db) == ("done", 10, 14, 10, 4, 0, 6, 4)
    assert count(db, "SELECT count(*) FROM promotion_statuses WHERE reported_at IS NULL") == 0


def test_reports_go_out_in_chunks_of_at_most_the_limit(rt, db, monkeypatch):
    monkeypatch.setattr(runs, "REPORT_CHUNK", 4)
    rt.optimove.processed = customers(11)
    rt.optimove.post_errors.append(TemporaryError("HTTP 503"))  # the first call fails: nothing is lost
    drain(rt, inbox.process_notification(rt, clearance(rt, datetime.now(timezone.utc) + timedelta(minutes=5))))
    drain(rt, sweeper.release_due(rt))
    assert [len(b["PromosUpdated"]) for b in rt.optimove.reports][:1] == [4]
    assert max(len(b["PromosUpdated"]) for b in rt.optimove.reports) <= 4
    assert sorted(reported(rt)) == sorted(f"K{i}" for i in range(11))
    assert sum(len(b["PromosUpdated"]) for b in rt.optimove.reports) == 11  # each customer once
    assert run_row(db)[0] == "done"


def test_a_deadline_that_already_passed_grants_nothing(rt, db):
    rt.optimove.processed = customers(5)
    nid = clearance(rt, datetime.now(timezone.utc) - timedelta(seconds=30))
    assert drain(rt, inbox.process_notification(rt, nid)) == []
    assert rt.optimove.fetches == [] and rt.bonus.applied == {}
    assert run_row(db) == ("deadline_missed", 0, 0, 0, 0, 0, 0, 0)
    with db.cursor() as cur:
        cur.execute("SELECT status, last_error FROM notifications")
        status, reason = cur.fetchone()
    assert status == "done" and "had passed when the notification was processed" in reason
    assert reason.endswith("nothing granted")


def test_deadline_too_close_reports_what_was_granted_and_grants_nothing_after(rt, db):
    rt.optimove.processed = customers(12)  # 16 codes, 6 grant batches of 3
    drain(rt, inbox.process_notification(rt, clearance(rt, datetime.now(timezone.utc) + timedelta(minutes=5))),
          skip={dispatch.GRANT_BATCH}) and None
    batches = []
    for run_id in [count(db, "SELECT id FROM campaign_runs")]:
        with unit_of_work(rt.engine) as conn:
            ids = [r[0] for r in conn.execute(repo.sa.text(
                "SELECT id FROM grants WHERE run_id = :r ORDER BY customer_id, promo_code"), {"r": run_id})]
        batches = [dispatch.Enqueue(dispatch.GRANT_BATCH, (run_id, ids[i:i + 3]), dispatch.GRANTS)
                   for i in range(0, len(ids), 3)]
    drain(rt, batches[:2])  # 6 codes granted while there is time
    granted_before = len(rt.bonus.applied)
    shift_deadline(db, 2.5)  # less than BONUS_TIMEOUT + 1 s left: no bonus call may start
    drain(rt, batches[2:])
    assert len(rt.bonus.applied) == granted_before == 6, "a grant was sent with the deadline too close"
    drain(rt, sweeper.release_due(rt))  # the statuses still go out before the deadline
    statuses = reported(rt)
    granted_customers = {i.customer_id for i in rt.bonus.applied.values()}
    assert {c for c, s in statuses.items() if s} <= granted_customers
    assert all(statuses[c] is False for c in statuses if c not in granted_customers)
    shift_deadline(db, -1)
    assert sweeper.release_due(rt) == []
    status, fetched, claimed, granted, rejected, expired, true_n, false_n = run_row(db)
    assert (status, fetched, claimed, granted, rejected) == ("deadline_missed", 12, 16, 6, 0)
    assert expired == 10 and granted + expired == claimed
    assert true_n == len([c for c, s in statuses.items() if s]) and true_n + false_n == len(statuses) == 12
    assert count(db, "SELECT count(*) FROM grants WHERE status = 'claimed'") == 0
    assert len(rt.bonus.applied) == 6  # nothing granted after the deadline


def test_paging_stops_when_the_deadline_leaves_only_time_to_report(rt, db):
    rt.optimove.processed = customers(12)
    nid = clearance(rt, datetime.now(timezone.utc) + timedelta(minutes=5))
    first = inbox.process_notification(rt, nid)
    shift_deadline(db, 12)  # the rate window is 10 s: 15 s are kept for reports
    drain(rt, first)
    assert rt.optimove.fetches == [] and rt.bonus.applied == {}
    assert "stopped fetching at 0" in count(db, "SELECT last_error FROM campaign_runs")
    shift_deadline(db, -1)
    sweeper.release_due(rt)
    assert run_row(db)[:2] == ("deadline_missed", 0)


def test_a_later_scheduled_notification_grants_nobody_twice(rt, db, tmp_path):
    rt.optimove.processed = customers(6)
    drain(rt, inbox.process_notification(rt, clearance(rt, datetime.now(timezone.utc) + timedelta(minutes=5))))
    rt.optimove.executions[504] = customers(8)  # the campaign then runs on a bonus channel, 2 more customers
    n = parse_notification({"EventTypeID": 13, "TimeStamp": "2026-11-28 11:00:00", "CampaignID": CAMPAIGN,
                            "ChannelID": 504})
    with unit_of_work(rt.engine) as conn:
        nid = repo.insert_notification(conn, n, "{}")[0]
    drain(rt, inbox.process_notification(rt, nid))
    grants = [(i.customer_id, i.promo_code) for c in rt.bonus.calls for i in c]
    assert len(grants) == len(set(grants)) == 11  # 8 + 3 second codes, each once
    with db.cursor() as cur:
        cur.execute("SELECT flow, claimed, duplicates_skipped FROM campaign_runs ORDER BY id")
        assert cur.fetchall() == [("conditional", 8, 0), ("scheduled_bonus", 3, 8)]
