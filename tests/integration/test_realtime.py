"""Real-time triggers (EventTypeID 11) on real Postgres: flows 5 (bonus) and 2 (send), both grant
policies, redeliveries, queues, and the routing table. Peers are the in-memory fake adapters."""
from __future__ import annotations

import json

import pytest

from shared import dispatch, repository as repo
from shared.adapters.bonus import FakeBonusAdapter, idempotency_key
from shared.adapters.send import FakeSendAdapter
from shared.db import unit_of_work
from shared.flows import inbox, sweeper
from shared.flows.base import Flow, Outcome
from shared.flows.grants import GRANTS
from shared.flows.routing import ROUTER, RouteConflict, Router
from shared.flows.sends import SENDS
from shared.runtime import Runtime
from shared.schemas import parse_notification
from tests.conftest import count, make_settings

pytestmark = pytest.mark.integration

BONUS, SEND = 600, 610


@pytest.fixture
def make_rt(database_url, redis_url, db, tmp_path):
    made = []

    def factory(**overrides):
        path = tmp_path / "channels.json"
        path.write_text(json.dumps({"default_role": "bonus", "channels": {
            str(BONUS): {"role": "bonus", "events": [11]}, str(SEND): {"role": "send", "events": [11, 13]}}}))
        rt = Runtime(make_settings(DATABASE_URL=database_url, REDIS_URL=redis_url, RELAY_CHANNEL_CONFIG=str(path),
                                   RELAY_SWEEP_AFTER=1, BONUS_MAX_ATTEMPTS=3, SEND_MAX_ATTEMPTS=3, **overrides))
        rt.__dict__["bonus"] = FakeBonusAdapter()
        rt.__dict__["send"] = FakeSendAdapter()
        made.append(rt)
        return rt

    yield factory
    for rt in made:
        rt.engine.dispose()


@pytest.fixture
def rt(make_rt):
    return make_rt()


def trigger(rt, body: dict) -> int:
    """Store an EventTypeID 11 as the listener would; return its id (an existing one for a duplicate)."""
    text = json.dumps(body)
    with unit_of_work(rt.engine) as conn:
        return repo.insert_notification(conn, parse_notification(json.loads(text)), text)[0]


def body(customer: str, channel: int = BONUS, **extra) -> dict:
    return {"EventTypeID": 11, "TimeStamp": "2026-11-28 10:00:00", "CampaignID": 9001, "ChannelID": channel,
            "CustomerID": customer, "TemplateID": 14, "PromoCode": ["A1", "B2"], **extra}


def status(db, nid: int) -> tuple:
    with db.cursor() as cur:
        cur.execute("SELECT status, last_error FROM notifications WHERE id = %s", (nid,))
        return cur.fetchone()


def test_bonus_trigger_grants_each_code_at_once_in_the_same_task(rt, db):
    nid = trigger(rt, body("c-1"))
    assert inbox.process_notification(rt, nid) == []  # delivered inline: nothing left to enqueue
    applied = sorted((i.customer_id, i.promo_code, i.source, i.notification_id) for i in rt.bonus.applied.values())
    assert applied == [("c-1", "A1", "realtime", nid), ("c-1", "B2", "realtime", nid)]
    assert len(rt.bonus.calls) == 1
    assert status(db, nid) == ("done", None)
    assert count(db, "SELECT count(*) FROM grants WHERE status = 'granted' AND notification_id = %s", nid) == 2
    with db.cursor() as cur:
        cur.execute("SELECT idempotency_key FROM grants WHERE promo_code = 'A1'")
        assert cur.fetchone()[0] == idempotency_key(9001, "c-1", "A1", f"notification:{nid}")


def test_redelivered_notification_grants_and_sends_nothing_more(rt, db):
    for channel in (BONUS, SEND):
        nid = trigger(rt, body("c-2", channel))
        assert trigger(rt, body("c-2", channel)) == nid  # the listener's dedupe: same row
        inbox.process_notification(rt, nid)
        assert inbox.process_notification(rt, nid) == []  # a redelivered task: finished, nothing happens
    assert sum(len(c) for c in rt.bonus.calls) == 2 and sum(len(c) for c in rt.send.calls) == 1
    with db.cursor() as cur:  # a replayed delivery batch finds nothing still claimed
        cur.execute("SELECT id FROM grants")
        assert GRANTS.deliver(rt, None, [r[0] for r in cur.fetchall()]) == []
    assert sum(len(c) for c in rt.bonus.calls) == 2


def test_once_per_notification_grants_a_new_trigger_again(rt, db):
    first = trigger(rt, body("c-3"))
    second = trigger(rt, body("c-3", TimeStamp="2026-11-28 11:00:00"))  # Optimove decided again
    assert first != second
    inbox.process_notification(rt, first)
    inbox.process_notification(rt, second)
    keys = {i.idempotency_key for i in rt.bonus.applied.values()}
    assert len(keys) == 4 and count(db, "SELECT count(*) FROM grants WHERE status = 'granted'") == 4


def test_once_per_campaign_shares_the_campaign_key(make_rt, db):
    rt = make_rt(RELAY_REALTIME_GRANT_POLICY="once_per_campaign")
    first = trigger(rt, body("c-4"))
    second = trigger(rt, body("c-4", TimeStamp="2026-11-28 11:00:00"))
    inbox.process_notification(rt, first)
    inbox.process_notification(rt, second)
    assert sorted(i.idempotency_key for i in rt.bonus.applied.values()) == sorted(
        idempotency_key(9001, "c-4", code) for code in ("A1", "B2"))
    assert all(i.notification_id is None for i in rt.bonus.applied.values())
    assert count(db, "SELECT count(*) FROM grants") == 2
    assert status(db, second) == ("done", "customer c-4 already holds these codes of campaign 9001 "
                                          "(once_per_campaign)")
    # and a scheduled campaign's grant of the same code is the same ledger row
    from shared.flows.ledger import Scope
    with unit_of_work(rt.engine) as conn:
        assert GRANTS.claim(conn, Scope(9001, 504, "scheduled_bonus"), [("c-4", "A1")]) == []


def test_send_trigger_sends_the_template_with_attributes_and_codes(rt, db):
    nid = trigger(rt, {"eventTypeId": 11, "campaignId": "9001", "channelId": SEND, "customerId": "c-5",
                       "templateId": 14, "promoCode": "A1,B2", "Email": "c5@example.com", "event_name": "deposit"})
    assert inbox.process_notification(rt, nid) == []
    [item] = rt.send.applied.values()
    assert (item.campaign_id, item.channel_id, item.template_id, item.customer_id, item.source) == (
        9001, SEND, 14, "c-5", "realtime")
    assert item.attributes == {"Email": "c5@example.com", "event_name": "deposit"}
    assert item.promo_codes == ["A1", "B2"] and item.scheduled_time is None and item.notification_id == nid
    assert item.idempotency_key == idempotency_key(9001, SEND, "c-5", 14, f"notification:{nid}")
    assert count(db, "SELECT count(*) FROM sends WHERE status = 'sent'") == 1
    assert not rt.bonus.calls


def test_send_trigger_without_promo_codes_is_valid(rt, db):
    nid = trigger(rt, {**body("c-6", SEND), "PromoCode": []})
    inbox.process_notification(rt, nid)
    assert [i.promo_codes for i in rt.send.applied.values()] == [[]]
    assert status(db, nid) == ("done", None)


def test_triggers_that_cannot_be_served_are_ignored_with_a_reason(rt, db):
    no_code = trigger(rt, {**body("c-7"), "PromoCode": ""})
    no_template = trigger(rt, {k: v for k, v in body("c-8", SEND).items() if k != "TemplateID"})
    for nid in (no_code, no_template):
        assert inbox.process_notification(rt, nid) == []
    assert status(db, no_code) == ("ignored", f"EventTypeID 11 on bonus channel {BONUS} carries no promo code")
    assert status(db, no_template) == ("ignored", f"EventTypeID 11 on send channel {SEND} has no TemplateID")
    assert not rt.bonus.calls and not rt.send.calls
    assert count(db, "SELECT count(*) FROM grants") + count(db, "SELECT count(*) FROM sends") == 0


def test_realtime_retries_and_sweeps_stay_on_the_realtime_queue(rt, db):
    rt.bonus.queue("retry", "retry")
    rt.send.queue("retry")
    grant_nid, send_nid = trigger(rt, body("c-9")), trigger(rt, body("c-9", SEND))
    retries = inbox.process_notification(rt, grant_nid) + inbox.process_notification(rt, send_nid)
    assert {(r.task, r.queue) for r in retries} == {(dispatch.GRANT_BATCH, dispatch.REALTIME),
                                                     (dispatch.SEND_BATCH, dispatch.REALTIME)}
    assert all(0 < r.countdown <= 30 for r in retries)
    with db.cursor() as cur:
        cur.execute("UPDATE grants SET updated_at = now() - interval '1 hour'")
        cur.execute("UPDATE sends SET updated_at = now() - interval '1 hour'")
    swept = sweeper.sweep(rt)
    assert {(s.task, s.queue) for s in swept} == {(dispatch.GRANT_BATCH, dispatch.REALTIME), (dispatch.SEND_BATCH, dispatch.REALTIME)}
    for item in swept:
        {dispatch.GRANT_BATCH: GRANTS, dispatch.SEND_BATCH: SENDS}[item.task].deliver(rt, *item.args)
    assert count(db, "SELECT count(*) FROM grants WHERE status = 'granted'") == 2
    assert count(db, "SELECT count(*) FROM sends WHERE status = 'sent'") == 1
    assert len(rt.bonus.applied) == 2 and len(rt.send.applied) == 1


def test_failed_realtime_rows_are_parked_and_redriven(rt, db):
    rt.send.queue("retry", "retry", "retry")
    nid = trigger(rt, body("c-10", SEND))
    follow = inbox.process_notification(rt, nid)
    follow = SENDS.deliver(rt, *follow[0].args)
    assert SENDS.deliver(rt, *follow[0].args) == []
    assert count(db, "SELECT count(*) FROM sends WHERE status = 'failed' AND attempts = 3") == 1
    runs, rows, items = sweeper.redrive_campaign(rt, 9001)
    assert (runs, rows) == (0, {"grants": 0, "sends": 1, "revokes": 0}) and items[0].queue == dispatch.REALTIME
    SENDS.deliver(rt, *items[0].args)
    assert count(db, "SELECT count(*) FROM sends WHERE status = 'sent'") == 1


def test_a_run_is_complete_only_when_no_row_of_any_ledger_is_in_flight(rt, db):
    from shared.flows.ledger import Scope
    from shared.flows.sends import SendClaim

    nid = trigger(rt, {"EventTypeID": 13, "CampaignID": 77, "ChannelID": SEND})
    with unit_of_work(rt.engine) as conn:
        run_id, _ = repo.create_run(conn, nid, "test_send", 77, SEND)
        ids = SENDS.claim(conn, Scope(77, SEND, "scheduled", run_id=run_id), [SendClaim("c1", 3), SendClaim("c2", 3)])
        repo.advance_run(conn, run_id, rows=2, claimed=2, duplicates=0, fetch_done=True)
        assert not repo.finish_run_if_complete(conn, run_id)
    SENDS.deliver(rt, run_id, ids)
    with unit_of_work(rt.engine) as conn:
        run = repo.get_run(conn, run_id)
    assert (run["status"], run["sent"], run["granted"]) == ("done", 2, 0)


def test_routes_of_the_five_flows():
    from shared.settings import ChannelConfig

    class S:
        channels = ChannelConfig(roles={BONUS: "bonus", SEND: "send"})

    names = {(e, c): (ROUTER.flow_for(ROUTER.route(e, c, S)) or Flow("-", "", None)).name
             for e, c in ((13, BONUS), (13, SEND), (11, BONUS), (11, SEND), (5, None), (4, None))}
    assert names == {(13, BONUS): "scheduled_bonus", (13, SEND): "scheduled_send", (11, BONUS): "realtime_bonus",
                     (11, SEND): "realtime_send", (5, None): "conditional", (4, None): "cancellation"}
    assert ROUTER.unrouted_reason(ROUTER.route(1, None, S)) == "no flow handles EventTypeID 1"


def test_a_second_registration_of_a_route_is_an_error():
    router = Router()
    one = Flow("one", "", lambda rt, conn, n: Outcome("done"))
    router.add(11, "bonus", one)
    with pytest.raises(RouteConflict, match="EventTypeID 11 on a bonus channel is already routed to one"):
        router.add(11, "bonus", Flow("two", "", lambda rt, conn, n: Outcome("done")))
    with pytest.raises(RouteConflict, match="two different flows are named 'one'"):
        router.add(13, "bonus", Flow("one", "", lambda rt, conn, n: Outcome("done")))
    router.add(11, "send", one)  # the same flow on two routes is fine


def test_status_view_of_a_realtime_campaign_comes_from_its_ledgers(rt, db):
    from shared.views import campaign_status

    rt.send.queue("retry")
    inbox.process_notification(rt, trigger(rt, body("c-11")))
    retry = inbox.process_notification(rt, trigger(rt, body("c-11", SEND)))
    with unit_of_work(rt.engine) as conn:
        status = campaign_status(conn, 9001)
    assert status["runs"] == [] and status["status"] == "running"
    assert status["ledgers"] == {"grants": {"granted": 2}, "sends": {"claimed": 1}, "revokes": {}}
    SENDS.deliver(rt, *retry[0].args)
    with unit_of_work(rt.engine) as conn:
        assert campaign_status(conn, 9001)["status"] == "done"
        assert campaign_status(conn, 424242)["status"] == "unknown"


def test_worker_tasks_replay_once_on_connections_killed_by_a_postgres_restart(redis_url, tmp_path):
    """Workers skip the pre-ping round trip: a task that meets a dead pooled connection runs once more."""
    from types import SimpleNamespace

    from cli.embedded import EmbeddedPostgres
    from shared.db import DatabaseUnavailable, upgrade
    from workers import tasks

    channels = tmp_path / "channels.json"
    channels.write_text(json.dumps({"channels": {str(SEND): {"role": "send"}}}))
    pg = EmbeddedPostgres(tmp_path / "pg")
    published, original = [], tasks.publish
    try:
        upgrade(pg.start())
        rt = Runtime(make_settings(DATABASE_URL=pg.url, REDIS_URL=redis_url, RELAY_CHANNEL_CONFIG=str(channels)),
                     pre_ping=False)
        rt.__dict__["send"] = FakeSendAdapter()
        task = SimpleNamespace(app=SimpleNamespace(relay_runtime=rt), request=SimpleNamespace(id="t-1"))
        tasks.publish = lambda app, items: published.append(items)
        tasks._run(task, inbox.process_notification, trigger(rt, body("c-20", SEND)))
        second = trigger(rt, body("c-21", SEND))
        pg.stop()
        pg.start()  # the pooled connection is now dead
        runs = []

        def process(rt, notification_id):
            runs.append(notification_id)
            return inbox.process_notification(rt, notification_id)

        tasks._run(task, process, second)  # meets the dead connection, then replays on a fresh one
        assert runs == [second, second]
        assert [i.customer_id for i in rt.send.applied.values()] == ["c-20", "c-21"]
        assert published == [[], []]
        pg.stop()
        with pytest.raises(DatabaseUnavailable):  # Postgres down: one replay (the pooled connection died), then it fails
            tasks._run(task, process, second)
        assert len(runs) == 4
        rt.engine.dispose()
    finally:
        tasks.publish = original
        pg.stop()
