"""Flow 1, pre-scheduled channel execution, on real Postgres: audience paging with attributes, timed
sends held until due (Postgres' clock), the sends ledger, redelivery, both roles in one campaign,
metrics back to Optimove, status. Peers are hand-written fakes (STYLE lesson 9)."""
from __future__ import annotations

import json
from datetime import datetime, timedelta, timezone
from zoneinfo import ZoneInfo

import pytest

from shared import dispatch, repository as repo
from shared.adapters.bonus import FakeBonusAdapter
from shared.adapters.send import FakeSendAdapter
from shared.db import unit_of_work
from shared.flows import inbox, paging, runs, sweeper
from shared.flows.grants import GRANTS
from shared.flows.routing import FLOWS
from shared.flows.sends import SENDS
from shared.optimove.client import PermanentError, TemporaryError
from shared.runtime import Runtime
from shared.schemas import parse_notification
from shared.views import campaign_status
from tests.conftest import count, make_settings, poll

pytestmark = pytest.mark.integration

SEND, BONUS, PLAIN = 510, 504, 511
CAMPAIGN = 4242


class FakeOptimove:
    """GetCustomerSendDetailsByChannel and GetCustomerExecutionDetailsByCampaign pages per channel;
    UpdateCampaignMetrics recorded; scripted errors for posts."""

    def __init__(self):
        self.audience: dict[int, list[dict]] = {}
        self.executions: dict[int, list[dict]] = {}
        self.calls: list[tuple[str, dict]] = []
        self.posts: list[tuple[str, object]] = []
        self.post_errors: list[Exception] = []

    def fetch_page(self, category, function, params, skip, top):
        self.calls.append((function, dict(params)))
        source = self.audience if function == "GetCustomerSendDetailsByChannel" else self.executions
        assert category == "customers"
        return source.get(params["ChannelID"], [])[skip:skip + top]

    def post(self, category, function, body, params=None):
        if self.post_errors:
            raise self.post_errors.pop(0)
        self.posts.append((function, body))


def optimove_time(when: datetime, zone: str = "UTC", seconds: bool = True) -> str:
    return when.astimezone(ZoneInfo(zone)).strftime("%Y-%m-%d %H:%M:%S" if seconds else "%Y-%m-%d %H:%M")


def audience(n: int, due: datetime, *, start: int = 0, template: int = 14, form: str = "list",
             zone: str = "UTC") -> list[dict]:
    rows = []
    for i in range(start, start + n):
        values = [f"c{i}@example.com", "US" if i % 2 else "GB"]
        row = {"CustomerID": f"C{i}", "TemplateID": template, "ScheduledTime": optimove_time(due, zone)}
        if form == "list":
            row["CustomerAttributes"] = values
        else:
            row["CustomerAttribute"] = ";".join(values)
        rows.append(row)
    return rows


@pytest.fixture
def make_rt(database_url, redis_url, db, tmp_path):
    made = []

    def factory(**overrides):
        path = tmp_path / "channels.json"
        path.write_text(json.dumps({"default_role": "bonus", "channels": {
            str(SEND): {"role": "send", "attributes": ["Email", "Country"]}, str(PLAIN): {"role": "send"},
            str(BONUS): {"role": "bonus"}}}))
        settings = dict(DATABASE_URL=database_url, REDIS_URL=redis_url, RELAY_CHANNEL_CONFIG=str(path),
                        OPTIMOVE_PAGE_SIZE=4, SEND_BATCH_SIZE=3, SEND_MAX_ATTEMPTS=3, RELAY_SWEEP_AFTER=1)
        rt = Runtime(make_settings(**{**settings, **overrides}))
        rt.__dict__["optimove"] = FakeOptimove()
        rt.__dict__["send"] = FakeSendAdapter()
        rt.__dict__["bonus"] = FakeBonusAdapter()
        made.append(rt)
        return rt

    yield factory
    for rt in made:
        rt.engine.dispose()


@pytest.fixture
def rt(make_rt):
    return make_rt()


def notify(rt, channel: int, stamp: str = "2026-11-28 10:00:00", campaign: int = CAMPAIGN) -> int:
    n = parse_notification({"EventTypeID": 13, "TimeStamp": stamp, "CampaignID": campaign, "ChannelID": channel})
    with unit_of_work(rt.engine) as conn:
        return repo.insert_notification(conn, n, "{}")[0]


def page(rt, run_id: int) -> list:
    return paging.fetch_next_page(rt, run_id, FLOWS)


TASKS = {dispatch.PROCESS_NOTIFICATION: inbox.process_notification, dispatch.FETCH_PAGE: page,
         dispatch.GRANT_BATCH: GRANTS.deliver, dispatch.SEND_BATCH: SENDS.deliver,
         dispatch.REPORT_METRICS: runs.report_metrics}


def drain(rt, items: list) -> list:
    """Run every follow-up (ignoring countdowns) until nothing is left; return what was run."""
    done, queue = [], list(items)
    while queue:
        item = queue.pop(0)
        done.append(item)
        queue.extend(TASKS[item.task](rt, *item.args))
    return done


def run_notification(rt, nid: int) -> list:
    return drain(rt, inbox.process_notification(rt, nid))


def sent(rt) -> dict[tuple[str, int], object]:
    """(customer, template) -> the item the fake send service applied."""
    return {(i.customer_id, i.template_id): i for i in rt.send.applied.values()}


def shift_due_times(db, seconds: float) -> None:
    """Move every waiting send's time `seconds` earlier: the same as the clock moving that far ahead."""
    with db.cursor() as cur:
        cur.execute("UPDATE sends SET scheduled_time = scheduled_time - make_interval(secs => %s) "
                    "WHERE status = 'waiting'", (seconds,))


def test_due_sends_go_at_once_and_later_ones_wait_until_their_time(rt, db):
    now = datetime.now(timezone.utc)
    rt.optimove.audience[SEND] = (audience(5, now - timedelta(minutes=1))
                                  + audience(6, now + timedelta(minutes=2), start=5, template=15))
    nid = notify(rt, SEND)
    run_notification(rt, nid)
    assert sorted(sent(rt)) == [(f"C{i}", 14) for i in range(5)]
    assert count(db, "SELECT count(*) FROM sends WHERE status = 'waiting'") == 6
    assert count(db, "SELECT status FROM campaign_runs") == "running"  # waiting rows are in flight
    assert sweeper.release_due(rt) == []  # not due yet: nothing is released, nothing is sent early
    assert sweeper.sweep(rt) == [] or all(e.task != dispatch.SEND_BATCH for e in sweeper.sweep(rt))

    shift_due_times(db, 110)  # ten seconds short of due
    assert sweeper.release_due(rt) == []
    shift_due_times(db, 11)   # now due
    released = sweeper.release_due(rt)
    assert {e.task for e in released} == {dispatch.SEND_BATCH} and {e.queue for e in released} == {dispatch.GRANTS}
    assert sweeper.release_due(rt) == []  # released once
    drain(rt, released)
    assert len(sent(rt)) == 11
    for (customer, template), item in sent(rt).items():
        assert datetime.fromisoformat(item.scheduled_time) <= datetime.now(timezone.utc)
        assert item.source == "scheduled" and item.channel_id == SEND and item.campaign_id == CAMPAIGN
    with db.cursor() as cur:
        cur.execute("SELECT status, fetched, claimed, sent, duplicates_skipped FROM campaign_runs")
        assert cur.fetchall() == [("done", 11, 11, 11, 0)]


def test_a_send_due_in_a_few_seconds_is_released_by_postgres_clock(rt, db):
    due = datetime.now(timezone.utc).replace(microsecond=0) + timedelta(seconds=3)
    rt.optimove.audience[SEND] = audience(2, due)
    run_notification(rt, notify(rt, SEND))
    assert sent(rt) == {}
    released = poll(lambda: sweeper.release_due(rt), timeout=15, message="the sends to become due")
    drain(rt, released)
    assert len(sent(rt)) == 2
    received = datetime.now(timezone.utc)
    assert received >= due


def test_audience_asks_for_the_channel_attributes_and_maps_both_forms(rt, db):
    past = datetime.now(timezone.utc) - timedelta(hours=1)
    rt.optimove.audience[SEND] = audience(2, past) + audience(2, past, start=2, form="string")
    rt.optimove.audience[PLAIN] = [{"CustomerID": "P1", "TemplateID": 3, "ScheduledTime": None}]
    run_notification(rt, notify(rt, SEND))
    run_notification(rt, notify(rt, PLAIN))
    params = [p for f, p in rt.optimove.calls]
    assert {"ChannelID": SEND, "CampaignID": CAMPAIGN, "CustomerAttributes": "Email;Country"} in params
    assert {"ChannelID": PLAIN, "CampaignID": CAMPAIGN} in params  # no attributes configured: parameter left out
    items = sent(rt)
    assert items[("C0", 14)].attributes == {"Email": "c0@example.com", "Country": "GB"}
    assert items[("C3", 14)].attributes == {"Email": "c3@example.com", "Country": "US"}  # CustomerAttribute string
    assert items[("P1", 3)].attributes == {} and items[("P1", 3)].scheduled_time is None  # no time: due now


def test_scheduled_time_is_read_in_the_optimove_time_zone(make_rt, db):
    rt = make_rt(OPTIMOVE_TIMEZONE="America/New_York")
    due = datetime.now(timezone.utc).replace(second=0, microsecond=0) + timedelta(hours=3)
    rt.optimove.audience[SEND] = [{"CustomerID": "Z1", "TemplateID": 1,
                                   "ScheduledTime": optimove_time(due, "America/New_York", seconds=False)}]
    run_notification(rt, notify(rt, SEND))
    with db.cursor() as cur:
        cur.execute("SELECT status, scheduled_time FROM sends")
        assert cur.fetchall() == [("waiting", due)]


def test_rows_without_template_or_with_a_bad_time_are_left_out(rt, db):
    past = optimove_time(datetime.now(timezone.utc) - timedelta(minutes=5))
    rt.optimove.audience[SEND] = [{"CustomerID": "A", "TemplateID": 1, "ScheduledTime": past},
                                  {"CustomerID": "B", "ScheduledTime": past},
                                  {"CustomerID": "C", "TemplateID": 1, "ScheduledTime": "tomorrow-ish"}]
    run_notification(rt, notify(rt, SEND))
    assert sorted(sent(rt)) == [("A", 1)]
    with db.cursor() as cur:
        cur.execute("SELECT status, fetched, claimed FROM campaign_runs")
        assert cur.fetchall() == [("done", 3, 1)]


def test_a_redelivered_or_repeated_notification_sends_nothing_twice(rt, db):
    now = datetime.now(timezone.utc)
    rt.optimove.audience[SEND] = audience(5, now - timedelta(minutes=1)) + audience(3, now + timedelta(hours=1),
                                                                                   start=5)
    nid = notify(rt, SEND)
    run_notification(rt, nid)
    assert notify(rt, SEND) == nid  # the same notification again: the inbox keeps one
    assert run_notification(rt, nid) == []
    assert notify(rt, SEND, stamp="2026-11-28 10:05:00") == nid  # a re-sent event of the same channel execution
    run_id = count(db, "SELECT id FROM campaign_runs")
    with db.cursor() as cur:  # a lost page task replayed from the start: the cursor check refuses it
        cur.execute("UPDATE campaign_runs SET cursor = 0, fetch_done = false WHERE id = %s", (run_id,))
    assert drain(rt, [dispatch.fetch_page(run_id)]) and len([i for c in rt.send.calls for i in c]) == 5
    with db.cursor() as cur:
        cur.execute("SELECT fetched - 8, claimed, duplicates_skipped FROM campaign_runs ORDER BY id")
        assert cur.fetchall() == [(8, 8, 8)]  # the replayed pages claimed nothing: 8 skipped
    assert count(db, "SELECT count(*) FROM sends") == 8


def test_a_campaign_on_both_roles_grants_and_sends_each_once(rt, db):
    rt.optimove.audience[SEND] = audience(6, datetime.now(timezone.utc) - timedelta(seconds=5))
    rt.optimove.executions[BONUS] = [{"CustomerID": f"C{i}", "PromoCode": "WB23"} for i in range(6)]
    for channel in (SEND, BONUS, SEND):
        run_notification(rt, notify(rt, channel, stamp=f"2026-11-28 10:0{channel % 7}:00"))
    assert sorted(c for c, _ in sent(rt)) == [f"C{i}" for i in range(6)]
    assert sorted(i.customer_id for i in rt.bonus.applied.values()) == [f"C{i}" for i in range(6)]
    status = campaign_status(db_conn := rt.engine.connect(), CAMPAIGN)
    db_conn.close()
    assert status["status"] == "done"
    assert status["totals"]["sent"] == 6 and status["totals"]["granted"] == 6
    assert status["ledgers"]["sends"] == {"sent": 6} and status["ledgers"]["grants"] == {"granted": 6}


def test_status_counts_waiting_sends(rt, db):
    now = datetime.now(timezone.utc)
    rt.optimove.audience[SEND] = audience(2, now - timedelta(minutes=1)) + audience(3, now + timedelta(hours=2),
                                                                                   start=2)
    run_notification(rt, notify(rt, SEND))
    with rt.engine.connect() as conn:
        status = campaign_status(conn, CAMPAIGN)
    (run,) = status["runs"]
    assert (run["flow"], run["status"], run["fetched"], run["claimed"], run["sent"], run["waiting"]) == \
        ("scheduled_send", "running", 5, 5, 2, 3)
    assert status["totals"]["waiting"] == 3 and status["ledgers"]["sends"] == {"sent": 2, "waiting": 3}


def test_failing_sends_retry_park_and_redrive(rt, db):
    rt.optimove.audience[SEND] = audience(2, datetime.now(timezone.utc) - timedelta(minutes=1))
    rt.send.queue("retry", "retry", "retry", "retry", "retry", "retry")  # 3 attempts x 2 sends
    run_notification(rt, notify(rt, SEND))
    assert count(db, "SELECT count(*) FROM sends WHERE status = 'failed'") == 2
    runs_, rows, items = sweeper.redrive_campaign(rt, CAMPAIGN)
    assert rows == {"grants": 0, "sends": 2, "revokes": 0}
    drain(rt, items)
    assert count(db, "SELECT count(*) FROM sends WHERE status = 'sent'") == 2
    assert count(db, "SELECT status FROM campaign_runs") == "done"


def test_metrics_reported_per_template_when_a_send_run_completes(make_rt, db):
    rt = make_rt(OPTIMOVE_REPORT_METRICS="true")
    past = datetime.now(timezone.utc) - timedelta(minutes=1)
    rt.optimove.audience[SEND] = audience(5, past) + audience(2, past, start=5, template=15)
    rt.send.reject_template(15)
    rt.optimove.post_errors.append(TemporaryError("HTTP 503"))  # the first report fails and is retried
    done = run_notification(rt, notify(rt, SEND))
    assert [e.args[1] for e in done if e.task == dispatch.REPORT_METRICS] == [1, 2]
    assert rt.optimove.posts == [("UpdateCampaignMetrics", [
        {"ChannelID": SEND, "CampaignID": CAMPAIGN, "TemplateID": 14, "MetricID": 0, "MetricValue": 5}])]
    assert count(db, "SELECT metrics_reported_at IS NOT NULL FROM campaign_runs") is True
    assert runs.report_metrics(rt, count(db, "SELECT id FROM campaign_runs")) == []  # reported once
    assert len(rt.optimove.posts) == 1


def test_metrics_off_by_default_and_a_permanent_error_is_recorded(make_rt, db):
    rt = make_rt()
    rt.optimove.audience[SEND] = audience(1, datetime.now(timezone.utc) - timedelta(minutes=1))
    done = run_notification(rt, notify(rt, SEND))
    assert not [e for e in done if e.task == dispatch.REPORT_METRICS] and rt.optimove.posts == []

    rt = make_rt(OPTIMOVE_REPORT_METRICS="true")
    rt.optimove.audience[SEND] = audience(1, datetime.now(timezone.utc) - timedelta(minutes=1))
    rt.optimove.post_errors.append(PermanentError("HTTP 403 Forbidden", 403))
    run_notification(rt, notify(rt, SEND, campaign=CAMPAIGN + 1))
    with db.cursor() as cur:
        cur.execute("SELECT metrics_reported_at, metrics_error FROM campaign_runs WHERE campaign_id = %s",
                    (CAMPAIGN + 1,))
        assert cur.fetchall() == [(None, "HTTP 403 Forbidden")]


def test_many_sends_due_at_once_are_released_in_one_job_each_once(rt, db):
    rt.optimove.audience[SEND] = audience(25, datetime.now(timezone.utc) + timedelta(hours=1))
    run_notification(rt, notify(rt, SEND))
    assert count(db, "SELECT count(*) FROM sends WHERE status = 'waiting'") == 25
    shift_due_times(db, 3601)
    released = SENDS.release_due(rt, batch=4)  # 7 transactions of at most 4 rows, in one job
    assert sorted(i for e in released for i in e.args[1]) == sorted(
        r[0] for r in _ids(db, "SELECT id FROM sends"))
    assert SENDS.release_due(rt, batch=4) == []
    drain(rt, released)
    assert len(sent(rt)) == 25 and count(db, "SELECT status FROM campaign_runs") == "done"


def _ids(db, sql: str) -> list[tuple]:
    with db.cursor() as cur:
        cur.execute(sql)
        return cur.fetchall()
