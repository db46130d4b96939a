"""`relay grants|sends retry` and `relay notifications list|show|replay` against real Postgres and Redis.

The commands run in-process (CliRunner) with DATABASE_URL and REDIS_URL set; what they publish is read
back from the Redis queues and run with the domain functions, as a worker would.
"""
from __future__ import annotations

import base64
import json

import pytest
import redis
from click.testing import CliRunner

from cli.main import main
from shared import dispatch, repository as repo
from shared.db import unit_of_work
from shared.flows.grants import GRANTS
from shared.flows.ledger import Scope
from shared.flows.sends import SENDS, SendClaim
from shared.schemas import parse_notification
from tests.conftest import count, queue_lengths
from tests.integration.test_ledger import TASKS, drain, notify, rt  # noqa: F401  (rt is a fixture)

pytestmark = pytest.mark.integration


@pytest.fixture
def cli(rt, database_url, redis_url, monkeypatch):
    monkeypatch.setenv("DATABASE_URL", database_url)
    monkeypatch.setenv("REDIS_URL", redis_url)
    runner = CliRunner()

    def run(*args: str):
        return runner.invoke(main, [str(a) for a in args])
    return run


def published(redis_url: str, queue: str) -> list[dispatch.Enqueue]:
    """Pop every message of a queue, as (task, args) Enqueue items."""
    client = redis.Redis.from_url(redis_url)
    out = []
    try:
        while (raw := client.rpop(queue)) is not None:
            message = json.loads(raw)
            args, _, _ = json.loads(base64.b64decode(message["body"]))
            out.append(dispatch.Enqueue(message["headers"]["task"], tuple(args), queue))
    finally:
        client.close()
    return out


def fail_campaign(rt, campaign: int = 11) -> int:
    """A campaign on channel 504 whose 20 grants all failed for good (3 attempts each); returns the run id."""
    rt.bonus.queue(*["retry"] * 60)
    drain(rt, [dispatch.process_notification(notify(rt, campaign, 504), 13)])
    with unit_of_work(rt.engine) as conn:
        assert repo.ledger_counts(conn, repo.GRANTS, campaign) == {"failed": 20}
        return repo.runs_for_campaign(conn, campaign)[0]["id"]


def failed_realtime_grant(rt, campaign: int = 12) -> None:
    n = parse_notification({"EventTypeID": 11, "CampaignID": campaign, "ChannelID": 504, "CustomerID": "RT1",
                            "PromoCode": "NOW5"})
    with unit_of_work(rt.engine) as conn:
        nid, _ = repo.insert_notification(conn, n, "{}")
        ids = GRANTS.claim(conn, Scope(campaign, 504, "realtime", notification_id=nid, per_notification=True),
                           [("RT1", "NOW5")])
        repo.settle(conn, repo.GRANTS, None, done=[], rejected=[], retry=[(i, "down") for i in ids], max_attempts=1)


def keys(db, table: str = "grants") -> dict[int, str]:
    with db.cursor() as cur:
        cur.execute(f"SELECT id, idempotency_key FROM {table}")
        return dict(cur.fetchall())


def test_grants_retry_requeues_failed_rows_with_the_same_keys(rt, cli, db, redis_url):
    run_id = fail_campaign(rt)
    failed_realtime_grant(rt)
    before = keys(db)

    result = cli("grants", "retry", "--campaign", 11)
    assert result.exit_code == 0, result.output
    assert result.output.splitlines() == [
        "grants: re-queued 20 failed grant(s) of 1 campaign(s) in 1 task(s) on grants (same idempotency keys)",
        "  campaign 11: 20"]
    assert count(db, "SELECT count(*) FROM grants WHERE campaign_id = 11 AND status = 'claimed' AND attempts = 0") == 20
    assert count(db, "SELECT count(*) FROM grants WHERE campaign_id = 12 AND status = 'failed'") == 1
    assert count(db, "SELECT count(*) FROM campaign_runs WHERE id = %s AND status = 'running'", run_id) == 1
    assert keys(db) == before
    assert queue_lengths(redis_url) == {"realtime": 0, "notifications": 0, "campaigns": 0, "grants": 1}

    # the published delivery, run as the worker runs it, grants them all and finishes the run
    items = published(redis_url, "grants")
    assert [i.task for i in items] == [dispatch.GRANT_BATCH] and items[0].args[0] == run_id
    drain(rt, items)
    with unit_of_work(rt.engine) as conn:
        assert repo.ledger_counts(conn, repo.GRANTS, 11) == {"granted": 20}
        assert repo.get_run(conn, run_id)["status"] == "done"
    assert {i.idempotency_key for i in rt.bonus.applied.values()} == {before[i] for i in before if i != 21}

    again = cli("grants", "retry", "--campaign", 11)
    assert again.exit_code == 0 and again.output == "grants: no failed grants in campaign 11; nothing re-queued\n"

    # without --campaign: every campaign; the real-time row goes back on the realtime queue
    everything = cli("grants", "retry")
    assert everything.exit_code == 0, everything.output
    assert everything.output.splitlines() == [
        "grants: re-queued 1 failed grant(s) of 1 campaign(s) in 1 task(s) on realtime (same idempotency keys)",
        "  campaign 12: 1"]
    assert queue_lengths(redis_url)["realtime"] == 1
    assert published(redis_url, "realtime")[0].args == (None, [21])


def test_sends_retry_and_unknown_campaign(rt, cli, db, redis_url):
    n = parse_notification({"EventTypeID": 13, "CampaignID": 31, "ChannelID": 600})
    with unit_of_work(rt.engine) as conn:
        nid, _ = repo.insert_notification(conn, n, "{}")
        run_id, _ = repo.create_run(conn, nid, "scheduled_send", 31, 600)
        ids = SENDS.claim(conn, Scope(31, 600, "scheduled_send", run_id=run_id),
                          [SendClaim("C1", 7), SendClaim("C2", 7)])
        repo.advance_run(conn, run_id, rows=2, claimed=2, duplicates=0, fetch_done=True)
        repo.settle(conn, repo.SENDS, run_id, done=[], rejected=[], retry=[(i, "down") for i in ids], max_attempts=1)
        repo.finish_run_if_complete(conn, run_id)
    result = cli("sends", "retry", "--campaign", 31, "--status", "failed")
    assert result.exit_code == 0, result.output
    assert result.output.startswith("sends: re-queued 2 failed send(s) of 1 campaign(s) in 1 task(s) on grants")
    assert count(db, "SELECT count(*) FROM sends WHERE status = 'claimed'") == 2
    assert [i.task for i in published(redis_url, "grants")] == [dispatch.SEND_BATCH]

    for group in ("grants", "sends"):
        unknown = cli(group, "retry", "--campaign", 999)
        assert unknown.exit_code == 2
        assert "campaign 999: the relay has no notification, run or" in unknown.output
    assert cli("sends", "retry", "--status", "granted").exit_code == 2  # not a status that can be retried
    assert sum(queue_lengths(redis_url).values()) == 0


def test_notifications_list_filters_and_show(rt, cli, db):
    drain(rt, [dispatch.process_notification(notify(rt, 11, 504), 13)])  # done, 20 grants
    notify(rt, 11, 505)                                                    # received
    failed_realtime_grant(rt)                                              # event 11, received
    with db.cursor() as cur:
        cur.execute("UPDATE notifications SET status = 'failed', last_error = 'gave up' WHERE id = 2")

    everything = cli("notifications", "list")
    assert everything.exit_code == 0, everything.output
    lines = everything.output.splitlines()
    assert lines[0].split() == ["id", "event", "campaign", "channel", "status", "tries", "received", "last", "error"]
    assert [line.split()[:5] for line in lines[1:4]] == [["3", "11", "12", "504", "received"],
                                                        ["2", "13", "11", "505", "failed"],
                                                        ["1", "13", "11", "504", "done"]]
    assert lines[2].endswith("gave up") and lines[-1] == "3 notification(s)"

    as_json = json.loads(cli("notifications", "list", "--event", 13, "--json").output)
    assert [n["id"] for n in as_json] == [2, 1] and as_json[1]["status"] == "done"
    assert [n["id"] for n in json.loads(cli("notifications", "list", "--status", "failed", "--json").output)] == [2]
    limited = cli("notifications", "list", "--limit", 1)
    assert limited.output.splitlines()[-1] == "1 notification(s) (the newest 1; --limit for more)"
    assert cli("notifications", "list", "--campaign", 5, "--json").output.strip() == "[]"
    assert cli("notifications", "list", "--status", "bogus").exit_code == 2

    shown = cli("notifications", "show", 1)
    assert shown.exit_code == 0, shown.output
    assert shown.output.splitlines()[0] == "notification 1: EventTypeID 13, campaign 11, channel 504: done after 1 attempt(s)"
    assert "  grants: granted 20" in shown.output.splitlines()
    view = json.loads(cli("notifications", "show", 1, "--json").output)
    assert view["runs"][0]["flow"] == "scheduled_bonus" and view["runs"][0]["claimed"] == 20
    assert view["ledgers"]["grants"] == {"granted": 20} and view["payload"] == {}

    rt_view = json.loads(cli("notifications", "show", 3, "--json").output)
    assert rt_view["runs"] == [] and rt_view["ledgers"]["grants"] == {"failed": 1}

    for args in (("show", 404), ("show", 404, "--json"), ("replay", 404)):
        missing = cli("notifications", *args)
        assert missing.exit_code == 2 and "notification 404: no such notification" in missing.output


def test_replay_of_a_finished_scheduled_notification_pages_again_and_claims_nothing_twice(rt, cli, db, redis_url):
    nid = notify(rt, 11, 504)
    drain(rt, [dispatch.process_notification(nid, 13)])
    with unit_of_work(rt.engine) as conn:
        run = repo.notification_runs(conn, nid)[0]
    assert run["status"] == "done" and run["claimed"] == 20
    pages_before, bonus_calls = len(rt.optimove.calls), len(rt.bonus.calls)

    result = cli("notifications", "replay", nid)
    assert result.exit_code == 0, result.output
    assert result.output == (f"notification {nid} (EventTypeID 13, campaign 11): done -> received, queued on "
                             f"notifications; 1 run(s) reopened ({run['id']})\n")
    assert count(db, "SELECT count(*) FROM notifications WHERE status = 'received' AND attempts = 0") == 1
    assert queue_lengths(redis_url)["notifications"] == 1

    drain(rt, published(redis_url, "notifications"))
    assert len(rt.optimove.calls) > pages_before         # it paged the campaign's list again
    assert len(rt.bonus.calls) == bonus_calls            # and sent nothing to the bonus system
    with unit_of_work(rt.engine) as conn:
        again = repo.notification_runs(conn, nid)[0]
        assert repo.get_notification(conn, nid)["status"] == "done"
        assert repo.ledger_counts(conn, repo.GRANTS, 11) == {"granted": 20}
    assert again["status"] == "done" and again["claimed"] == 20
    assert again["duplicates_skipped"] == run["duplicates_skipped"] + 20
    assert count(db, "SELECT count(*) FROM grants") == 20


def test_replay_of_a_realtime_notification_claims_nothing_new(rt, cli, db, redis_url):
    text = json.dumps({"EventTypeID": 11, "TimeStamp": "2026-11-28 10:00:00", "CampaignID": 40, "ChannelID": 504,
                       "CustomerID": "RT1", "PromoCode": "NOW5"})
    with unit_of_work(rt.engine) as conn:
        nid, _ = repo.insert_notification(conn, parse_notification(json.loads(text)), text)
    drain(rt, [dispatch.process_notification(nid, 11)])
    assert count(db, "SELECT count(*) FROM grants WHERE status = 'granted'") == 1
    calls = len(rt.bonus.calls)
    result = cli("notifications", "replay", nid)
    assert result.exit_code == 0, result.output
    assert "done -> received, queued on realtime; 0 run(s) reopened" in result.output
    drain(rt, published(redis_url, "realtime"))
    assert count(db, "SELECT count(*) FROM grants") == 1 and len(rt.bonus.calls) == calls
    assert count(db, "SELECT count(*) FROM notifications WHERE status = 'done'") == 1
