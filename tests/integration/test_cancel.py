"""Cancellation (EventTypeID 4) on real Postgres: pending grants and sends stop, runs stop paging, grants
already made to listed customers are revoked exactly once (also those of a batch in flight), a
second EventTypeID 4 changes nothing, and a bonus adapter without revoke leaves `revoke_unsupported`."""
from __future__ import annotations

import json
from datetime import datetime, timedelta, timezone

import pytest

from shared import dispatch, repository as repo
from shared.adapters.bonus import FakeBonusAdapter
from shared.adapters.send import FakeSendAdapter
from shared.db import unit_of_work
from shared.flows import inbox, paging, sweeper
from shared.flows.grants import GRANTS
from shared.flows.revokes import REVOKES
from shared.flows.routing import FLOWS
from shared.flows.sends import SENDS
from shared.runtime import Runtime
from shared.schemas import parse_notification
from tests.conftest import count, make_settings

pytestmark = pytest.mark.integration

CAMPAIGN, BONUS, SEND = 7070, 504, 510


class FakeOptimove:
    def __init__(self):
        self.pages: dict[tuple[str, int | None], list[dict]] = {}

    def fetch_page(self, category, function, params, skip, top):
        return self.pages.get((function, params.get("ChannelID")), [])[skip:skip + top]


@pytest.fixture
def rt(database_url, redis_url, db, tmp_path):
    path = tmp_path / "channels.json"
    path.write_text(json.dumps({"channels": {str(BONUS): {"role": "bonus"}, str(SEND): {"role": "send"}}}))
    runtime = Runtime(make_settings(DATABASE_URL=database_url, REDIS_URL=redis_url, RELAY_CHANNEL_CONFIG=str(path),
                                    OPTIMOVE_PAGE_SIZE=4, BONUS_BATCH_SIZE=3, RELAY_SWEEP_AFTER=1))
    runtime.__dict__["optimove"] = FakeOptimove()
    runtime.__dict__["bonus"] = FakeBonusAdapter()
    runtime.__dict__["send"] = FakeSendAdapter()
    yield runtime
    runtime.engine.dispose()


TASKS = {dispatch.PROCESS_NOTIFICATION: inbox.process_notification,
         dispatch.FETCH_PAGE: lambda rt, run_id: paging.fetch_next_page(rt, run_id, FLOWS),
         dispatch.GRANT_BATCH: GRANTS.deliver, dispatch.SEND_BATCH: SENDS.deliver,
         dispatch.REVOKE_BATCH: REVOKES.deliver}


def drain(rt, items: list, hold: set = frozenset()) -> list:
    held, queue = [], list(items)
    while queue:
        item = queue.pop(0)
        if item.task in hold:
            held.append(item)
            continue
        queue.extend(TASKS[item.task](rt, *item.args))
    return held


def notify(rt, body: dict) -> int:
    with unit_of_work(rt.engine) as conn:
        return repo.insert_notification(conn, parse_notification(body), json.dumps(body))[0]


def scheduled(rt, channel: int) -> int:
    return notify(rt, {"EventTypeID": 13, "TimeStamp": "2026-11-28 10:00:00", "CampaignID": CAMPAIGN,
                       "ChannelID": channel})


def cancellation(rt) -> int:
    return notify(rt, {"EventTypeID": 4, "TimeStamp": "2026-11-28 10:30:00", "CampaignID": CAMPAIGN})


def statuses(db, table: str) -> dict[str, int]:
    with db.cursor() as cur:
        cur.execute(f"SELECT status, count(*) FROM {table} WHERE campaign_id = %s GROUP BY 1", (CAMPAIGN,))
        return dict(cur.fetchall())


def test_cancellation_stops_pending_work_and_revokes_made_grants_once(rt, db):
    rows = [{"CustomerID": f"C{i}", "PromoCode": "WB23"} for i in range(12)]
    rt.optimove.pages[("GetCustomerExecutionDetailsByCampaign", BONUS)] = rows
    later = (datetime.now(timezone.utc) + timedelta(hours=1)).strftime("%Y-%m-%d %H:%M:%S")
    rt.optimove.pages[("GetCustomerSendDetailsByChannel", SEND)] = [
        {"CustomerID": f"C{i}", "TemplateID": 3, "ScheduledTime": later} for i in range(5)]
    rt.optimove.pages[("GetCanceledCampaignCustomers", None)] = [
        {"CustomerID": f"C{i}", "ActionID": "4", "PromoCode": "WB23"} for i in range(0, 12, 2)]
    # the bonus run: its pages are claimed, one grant batch of 3 goes out, the rest waits in the queue
    pending = drain(rt, inbox.process_notification(rt, scheduled(rt, BONUS)), hold={dispatch.GRANT_BATCH})
    drain(rt, pending[:1])
    drain(rt, inbox.process_notification(rt, scheduled(rt, SEND)))  # 5 sends wait for their time
    assert statuses(db, "grants") == {"granted": 3, "claimed": 9} and statuses(db, "sends") == {"waiting": 5}

    nid = cancellation(rt)
    drain(rt, inbox.process_notification(rt, nid) + pending[1:])
    assert statuses(db, "grants") == {"revoked": 2, "granted": 1, "cancelled": 9}  # C0, C2 listed; C1 not
    assert statuses(db, "sends") == {"cancelled": 5}
    assert len(rt.bonus.applied) == 3 and sorted(i.customer_id for i in rt.bonus.revoked.values()) == ["C0", "C2"]
    assert statuses(db, "revokes") == {"revoked": 2}
    with db.cursor() as cur:
        cur.execute("SELECT flow, status, cancelled, revoked FROM campaign_runs ORDER BY id")
        assert cur.fetchall() == [("scheduled_bonus", "cancelled", 9, 0), ("scheduled_send", "cancelled", 5, 0),
                                  ("cancellation", "done", 0, 2)]
    assert count(db, "SELECT last_error FROM notifications WHERE id = %s", nid) == \
        "stopped 2 run(s), 9 pending grant(s), 5 pending send(s)"

    # a second EventTypeID 4 is the same notification, and processing it again changes nothing
    assert cancellation(rt) == nid
    assert drain(rt, inbox.process_notification(rt, nid)) == []
    drain(rt, sweeper.sweep(rt))
    assert len(rt.bonus.revoke_calls) == 1 and statuses(db, "revokes") == {"revoked": 2}


def test_a_batch_in_flight_when_the_cancellation_lands_is_settled_and_revoked(rt, db):
    rt.optimove.pages[("GetCustomerExecutionDetailsByCampaign", BONUS)] = [
        {"CustomerID": f"C{i}", "PromoCode": "WB23"} for i in range(3)]
    rt.optimove.pages[("GetCanceledCampaignCustomers", None)] = [{"CustomerID": f"C{i}"} for i in range(3)]
    (batch,) = drain(rt, inbox.process_notification(rt, scheduled(rt, BONUS)), hold={dispatch.GRANT_BATCH})
    run_id, ids = batch.args
    with unit_of_work(rt.engine) as conn:
        in_flight = repo.claimed_rows(conn, repo.GRANTS, ids)  # the worker read its rows and is calling out
    drain(rt, inbox.process_notification(rt, cancellation(rt)))
    assert statuses(db, "grants") == {"cancelled": 3} and statuses(db, "revokes") == {}
    drain(rt, GRANTS.deliver_claimed(rt, run_id, in_flight))  # the bonus system answers: granted
    assert len(rt.bonus.applied) == 3
    assert statuses(db, "grants") == {"revoked": 3} and len(rt.bonus.revoked) == 3


def test_without_revoke_support_grants_are_marked_revoke_unsupported(rt, db):
    class NoRevoke(FakeBonusAdapter):
        can_revoke = False

    rt.__dict__["bonus"] = NoRevoke()
    rt.optimove.pages[("GetCustomerExecutionDetailsByCampaign", BONUS)] = [{"CustomerID": "C1", "PromoCode": "A"}]
    rt.optimove.pages[("GetCanceledCampaignCustomers", None)] = [{"CustomerID": "C1", "PromoCode": "A"}]
    drain(rt, inbox.process_notification(rt, scheduled(rt, BONUS)))
    drain(rt, inbox.process_notification(rt, cancellation(rt)))
    assert statuses(db, "grants") == {"revoke_unsupported": 1}
    assert statuses(db, "revokes") == {"rejected": 1}
    assert "BONUS_REVOKE_URL" in count(db, "SELECT reason FROM revokes")


def test_deactivation_revokes_grants_of_ended_actions_once_per_date(database_url, redis_url, db, tmp_path):
    from shared.flows import deactivation

    runtime = Runtime(make_settings(DATABASE_URL=database_url, REDIS_URL=redis_url, RELAY_DEACTIVATION="true",
                                    OPTIMOVE_PAGE_SIZE=2, RELAY_SWEEP_AFTER=1))
    optimove = FakeOptimove()
    asked: list[dict] = []

    def iter_pages(category, function, params, page_size):
        asked.append(dict(params))
        rows = optimove.pages.get((function, None), []) if params["Date"] == yesterday else []
        for i in range(0, len(rows), page_size):
            yield rows[i:i + page_size]

    optimove.iter_pages = iter_pages
    runtime.__dict__["optimove"] = optimove
    runtime.__dict__["bonus"] = FakeBonusAdapter()
    try:
        optimove.pages[("GetCustomerExecutionDetailsByCampaign", BONUS)] = [
            {"CustomerID": "C1", "PromoCode": "A,B", "ActionID": 4}, {"CustomerID": "C2", "PromoCode": "A",
                                                                       "ActionID": "5"},
            {"CustomerID": "C3", "PromoCode": "A", "ActionID": 4}]
        drain(runtime, inbox.process_notification(runtime, scheduled(runtime, BONUS)))
        assert count(db, "SELECT count(*) FROM grants WHERE action_id IS NOT NULL AND status = 'granted'") == 4
        today = count(db, "SELECT (now() AT TIME ZONE 'UTC')::date")
        yesterday = (today - timedelta(days=1)).isoformat()
        optimove.pages[("GetCustomersActionEndedByDate", None)] = [
            {"CustomerID": "C1", "ActionID": 4, "ChannelID": BONUS, "Date": yesterday},   # both codes of C1
            {"CustomerID": "C2", "ActionID": 9, "ChannelID": BONUS},                     # another action
            {"CustomerID": "C3", "ActionID": "4", "ChannelID": 0},                        # any channel
            {"CustomerID": "C3", "ActionID": 4, "ChannelID": 999}]                        # another channel
        drain(runtime, deactivation.deactivate(runtime))
        assert [p["Date"] for p in asked] == [(today - timedelta(days=k)).isoformat() for k in (3, 2, 1)]
        assert sorted((i.customer_id, i.promo_code) for i in runtime.bonus.revoked.values()) == \
            [("C1", "A"), ("C1", "B"), ("C3", "A")]
        with db.cursor() as cur:
            cur.execute("SELECT customer_id, status FROM grants ORDER BY customer_id, promo_code")
            assert cur.fetchall() == [("C1", "revoked"), ("C1", "revoked"), ("C2", "granted"), ("C3", "revoked")]
            cur.execute("SELECT date::text, status, rows_read, revokes FROM deactivations ORDER BY date")
            assert cur.fetchall()[-1] == (yesterday, "done", 4, 3)
        asked.clear()
        assert deactivation.deactivate(runtime) == [] and asked == []  # each date once
    finally:
        runtime.engine.dispose()


def test_deactivation_is_off_by_default(rt, db):
    from shared.flows import deactivation

    assert deactivation.deactivate(rt) == []
    assert count(db, "SELECT count(*) FROM deactivations") == 0
