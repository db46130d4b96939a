"""Metrics on real Postgres and Redis: batches through the real ledger path move the counters by exactly what
the ledgers recorded; queue depth is LLEN; `/metrics` carries every family without reading whole tables."""
from __future__ import annotations

import json
from datetime import datetime, timedelta, timezone

import pytest
from prometheus_client import REGISTRY

from shared import dispatch, repository as repo
from shared.adapters.bonus import FakeBonusAdapter
from shared.adapters.send import FakeSendAdapter
from shared.broker import create_app as create_celery, publish
from shared.db import unit_of_work
from shared.flows import inbox, paging
from shared.flows.grants import GRANTS
from shared.flows.ledger import Scope
from shared.flows.routing import FLOWS
from shared.flows.sends import SENDS
from shared.optimove.client import PermanentError
from shared.runtime import Runtime
from shared.schemas import parse_notification
from tests.conftest import count, make_settings, queue_lengths

pytestmark = pytest.mark.integration

BONUS_A, BONUS_B, SEND, RT_BONUS, RT_SEND = 504, 505, 610, 600, 611


def value(name: str, **labels) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


class Moves:
    """How much some samples of this process's registry moved since construction."""

    def __init__(self, **samples: tuple[str, dict]):
        self.samples = samples
        self.before = {key: value(name, **labels) for key, (name, labels) in samples.items()}

    def delta(self) -> dict[str, float]:
        return {key: value(name, **labels) - self.before[key] for key, (name, labels) in self.samples.items()}


class FakeOptimove:
    """Campaign pages per channel for both paged functions; scripted errors."""

    def __init__(self):
        self.pages: dict[int, list[dict]] = {}
        self.errors: list[Exception] = []

    def fetch_page(self, category, function, params, skip, top):
        if self.errors:
            raise self.errors.pop(0)
        return self.pages.get(params["ChannelID"], [])[skip:skip + top]


@pytest.fixture
def rt(database_url, redis_url, db, tmp_path):
    path = tmp_path / "channels.json"
    path.write_text(json.dumps({"default_role": "bonus", "channels": {
        str(BONUS_A): {"role": "bonus"}, str(BONUS_B): {"role": "bonus"}, str(SEND): {"role": "send"},
        str(RT_BONUS): {"role": "bonus", "events": [11]}, str(RT_SEND): {"role": "send", "events": [11]}}}))
    runtime = Runtime(make_settings(DATABASE_URL=database_url, REDIS_URL=redis_url, RELAY_CHANNEL_CONFIG=str(path),
                                    OPTIMOVE_PAGE_SIZE=4, BONUS_BATCH_SIZE=3, SEND_BATCH_SIZE=3,
                                    BONUS_MAX_ATTEMPTS=2, OPTIMOVE_MAX_ATTEMPTS=2))
    runtime.__dict__["optimove"] = FakeOptimove()
    runtime.__dict__["bonus"] = FakeBonusAdapter()
    runtime.__dict__["send"] = FakeSendAdapter()
    yield runtime
    runtime.engine.dispose()


def notify(rt, body: dict) -> int:
    text = json.dumps(body)
    with unit_of_work(rt.engine) as conn:
        return repo.insert_notification(conn, parse_notification(json.loads(text)), text)[0]


TASKS = {dispatch.PROCESS_NOTIFICATION: inbox.process_notification,
         dispatch.FETCH_PAGE: lambda rt, run_id: paging.fetch_next_page(rt, run_id, FLOWS),
         dispatch.GRANT_BATCH: GRANTS.deliver, dispatch.SEND_BATCH: SENDS.deliver}


def drain(rt, items: list) -> None:
    """Run every follow-up (ignoring countdowns) until nothing is left, as the workers would."""
    queue = list(items)
    while queue:
        item = queue.pop(0)
        queue.extend(TASKS[item.task](rt, *item.args))


def campaign_rows(start: int, n: int, codes: str) -> list[dict]:
    return [{"CustomerID": f"C{i}", "PromoCode": codes} for i in range(start, start + n)]


def test_grant_batches_move_the_counters_by_what_the_ledger_recorded(rt, db):
    rt.optimove.pages = {BONUS_A: campaign_rows(0, 10, "WB23,NV10"), BONUS_B: campaign_rows(5, 10, "WB23")}
    rt.bonus.reject_code("NV10")
    rt.bonus.queue("retry", "retry", "retry")  # three items fail once, then go through on their retry
    flow = "scheduled_bonus"
    moves = Moves(granted=("relay_grants_total", {"flow": flow, "outcome": "granted"}),
                  rejected=("relay_grants_total", {"flow": flow, "outcome": "rejected"}),
                  retry=("relay_grants_total", {"flow": flow, "outcome": "retry"}),
                  failed=("relay_grants_total", {"flow": flow, "outcome": "failed"}),
                  claims=("relay_claims_total", {"ledger": "grants", "flow": flow}),
                  duplicates=("relay_duplicates_skipped_total", {"flow": flow}),
                  runs=("relay_run_duration_seconds_count", {"flow": flow, "status": "done"}),
                  notifications=("relay_notifications_processed_total", {"event_type": "13", "status": "done"}))
    ids = [notify(rt, {"EventTypeID": 13, "CampaignID": 77, "ChannelID": ch}) for ch in (BONUS_A, BONUS_B)]
    drain(rt, [item for nid in ids for item in inbox.process_notification(rt, nid)])
    got = moves.delta()
    assert got == {
        "granted": count(db, "SELECT count(*) FROM grants WHERE status = 'granted'"),
        "rejected": count(db, "SELECT count(*) FROM grants WHERE status = 'rejected'"),
        "retry": 3, "failed": 0,
        "claims": count(db, "SELECT sum(claimed) FROM campaign_runs"),
        "duplicates": count(db, "SELECT sum(duplicates_skipped) FROM campaign_runs"),
        "runs": 2, "notifications": 2}
    assert (got["granted"], got["rejected"], got["claims"], got["duplicates"]) == (15, 10, 25, 5)
    assert value("relay_run_duration_seconds_sum", flow=flow, status="done") > 0


def test_send_batches_and_realtime_triggers_count_under_their_flows(rt, db):
    due = (datetime.now(timezone.utc) - timedelta(minutes=1)).strftime("%Y-%m-%d %H:%M:%S")
    rt.optimove.pages = {SEND: [{"CustomerID": f"S{i}", "TemplateID": 14 + i % 2, "ScheduledTime": due}
                                for i in range(7)]}
    rt.send.reject_template(15)
    moves = Moves(sent=("relay_sends_total", {"flow": "scheduled_send", "outcome": "sent"}),
                  rejected=("relay_sends_total", {"flow": "scheduled_send", "outcome": "rejected"}),
                  claims=("relay_claims_total", {"ledger": "sends", "flow": "scheduled_send"}),
                  rt_granted=("relay_grants_total", {"flow": "realtime_bonus", "outcome": "granted"}),
                  rt_sent=("relay_sends_total", {"flow": "realtime_send", "outcome": "sent"}),
                  rt_dups=("relay_duplicates_skipped_total", {"flow": "realtime_bonus"}),
                  triggers=("relay_notifications_processed_total", {"event_type": "11", "status": "done"}),
                  runs=("relay_run_duration_seconds_count", {"flow": "scheduled_send", "status": "done"}))
    drain(rt, inbox.process_notification(rt, notify(rt, {"EventTypeID": 13, "CampaignID": 88, "ChannelID": SEND})))
    trigger = {"EventTypeID": 11, "TimeStamp": "2026-11-28 10:00:00", "CampaignID": 9001, "CustomerID": "c-1",
               "TemplateID": 14, "PromoCode": ["A1", "B2"]}
    drain(rt, inbox.process_notification(rt, notify(rt, {**trigger, "ChannelID": RT_BONUS})))
    drain(rt, inbox.process_notification(rt, notify(rt, {**trigger, "ChannelID": RT_SEND})))
    # the same trigger's codes claimed again in its scope (a replayed claim): nothing new, two duplicates
    with unit_of_work(rt.engine) as conn:
        nid = count(db, "SELECT min(notification_id) FROM grants WHERE source = 'realtime'")
        scope = Scope(9001, RT_BONUS, "realtime", notification_id=nid, per_notification=True)
        assert GRANTS.claim(conn, scope, [("c-1", "A1"), ("c-1", "B2")]) == []
    assert moves.delta() == {"sent": 4, "rejected": 3, "claims": 7, "rt_granted": 2, "rt_sent": 1, "rt_dups": 2,
                             "triggers": 2, "runs": 1}
    assert count(db, "SELECT count(*) FROM sends WHERE status = 'sent' AND source = 'scheduled'") == 4


def test_a_rolled_back_claim_counts_nothing(rt, db):
    moves = Moves(claims=("relay_claims_total", {"ledger": "grants", "flow": "scheduled_bonus"}),
                  dups=("relay_duplicates_skipped_total", {"flow": "scheduled_bonus"}))
    with pytest.raises(RuntimeError), unit_of_work(rt.engine) as conn:
        assert len(GRANTS.claim(conn, Scope(5, BONUS_A, "scheduled_bonus"), [("C1", "X"), ("C2", "X")])) == 2
        raise RuntimeError("the page's transaction fails after the claim")
    assert count(db, "SELECT count(*) FROM grants") == 0
    assert moves.delta() == {"claims": 0, "dups": 0}


def test_a_failed_run_is_timed_under_failed(rt, db):
    rt.optimove.errors.append(PermanentError("HTTP 403: forbidden", 403))
    moves = Moves(failed=("relay_run_duration_seconds_count", {"flow": "scheduled_bonus", "status": "failed"}))
    drain(rt, inbox.process_notification(rt, notify(rt, {"EventTypeID": 13, "CampaignID": 9, "ChannelID": BONUS_A})))
    assert count(db, "SELECT count(*) FROM campaign_runs WHERE status = 'failed'") == 1
    assert moves.delta() == {"failed": 1}


# -- /metrics ----------------------------------------------------------------------------------------

@pytest.fixture
def client(settings):
    from web.app import create_app

    return create_app(settings).test_client()


def scrape(client) -> str:
    response = client.get("/metrics")
    assert response.status_code == 200
    return response.get_data(as_text=True)


def test_queue_depth_is_llen_of_each_queue(client, settings, redis_url):
    app = create_celery(settings, publisher=True)
    publish(app, [dispatch.Enqueue(dispatch.GRANT_BATCH, (1, [i]), dispatch.GRANTS) for i in range(7)]
            + [dispatch.Enqueue(dispatch.PROCESS_NOTIFICATION, (i,), dispatch.REALTIME) for i in range(3)])
    lengths = queue_lengths(redis_url)
    assert lengths == {"realtime": 3, "notifications": 0, "campaigns": 0, "grants": 7}
    text = scrape(client)
    for queue, n in lengths.items():
        assert f'relay_queue_messages{{queue="{queue}"}} {n}.0' in text
    assert "relay_queue_unacked_messages 0.0" in text
    assert 'relay_metrics_source_up{source="broker"} 1.0' in text


def test_metrics_has_every_family_and_counts_only_the_unfinished_inbox(client, rt, db, monkeypatch):
    drain(rt, inbox.process_notification(rt, notify(rt, {
        "EventTypeID": 11, "TimeStamp": "2026-11-28 10:00:00", "CampaignID": 9002, "ChannelID": RT_BONUS,
        "CustomerID": "c-9", "PromoCode": "Z1"})))
    for i in range(3):
        notify(rt, {"EventTypeID": 13, "CampaignID": 500 + i, "ChannelID": BONUS_A})
    processing = notify(rt, {"EventTypeID": 5, "TimeStamp": "2026-11-27 09:00:00", "CampaignID": 600,
                              "ClearanceRequiredBy": "2030-01-01 10:00"})
    with db.cursor() as cur:
        cur.execute("UPDATE notifications SET status = 'processing' WHERE id = %s", (processing,))
        cur.execute("INSERT INTO campaign_runs (notification_id, flow, campaign_id, channel_id) "
                    "VALUES (%s, 'conditional', 600, NULL)", (processing,))
        cur.execute("INSERT INTO campaign_runs (notification_id, flow, campaign_id, channel_id, status, finished_at) "
                    "SELECT id, 'scheduled_bonus', campaign_id, channel_id, 'failed', now() FROM notifications "
                    "WHERE campaign_id = 500")
    text = scrape(client)
    assert 'relay_notifications{event_type="13",status="received"} 3.0' in text
    assert 'relay_notifications{event_type="5",status="processing"} 1.0' in text
    assert 'status="done"' not in "\n".join(l for l in text.splitlines() if l.startswith("relay_notifications{"))
    assert "relay_notifications_backlog_truncated 0.0" in text
    assert 'relay_runs{flow="conditional",status="running"} 1.0' in text
    assert 'relay_runs_ended_recently{flow="scheduled_bonus",status="failed"} 1.0' in text
    for table in ("notifications", "campaign_runs", "grants", "sends", "revokes"):
        assert f'relay_table_rows_estimated{{table="{table}"}}' in text
    assert 'relay_metrics_source_up{source="postgres"} 1.0' in text
    # what this process counted: the trigger's grant, its notification, the listener's histogram
    assert 'relay_grants_total{flow="realtime_bonus",outcome="granted"}' in text
    assert 'relay_notifications_processed_total{event_type="11",status="done"}' in text
    for family in ("relay_optimove_calls_total", "relay_optimove_429_total", "relay_limiter_wait_seconds",
                   "relay_adapter_call_seconds", "relay_run_duration_seconds", "relay_duplicates_skipped_total",
                   "relay_sends_total", "relay_listener_latency_seconds"):
        assert f"# TYPE {family}" in text or f"# HELP {family}" in text, family

    monkeypatch.setattr("web.metrics.BACKLOG_CAP", 2)
    text = scrape(client)
    assert "relay_notifications_backlog_truncated 1.0" in text
    counted = [float(l.rsplit(" ", 1)[1]) for l in text.splitlines() if l.startswith("relay_notifications{")]
    assert sum(counted) == 2


def test_the_backlog_query_reads_the_partial_index(rt, db):
    """The unfinished-notification and running-run counts are planned on their partial indexes."""
    with db.cursor() as cur:
        cur.execute("SET enable_seqscan = off")  # with empty tables the planner would pick a seq scan anyway
        cur.execute("EXPLAIN SELECT event_type, status FROM notifications WHERE status IN ('received', 'processing') "
                    "LIMIT 10")
        plan = "\n".join(r[0] for r in cur.fetchall())
        assert "notifications_unfinished" in plan, plan
        cur.execute("EXPLAIN SELECT flow FROM campaign_runs WHERE status = 'running' LIMIT 10")
        plan = "\n".join(r[0] for r in cur.fetchall())
        assert "campaign_runs_unfinished" in plan, plan
