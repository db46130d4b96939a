"""Flow 1 (pre-scheduled sends) under fire: a redelivered notification, a worker SIGKILLed mid-run, a send
service failing 30 % of its calls.

Each test runs real `relay web` / `relay worker` / `relay beat` against the simulator with a campaign whose
clock started a few seconds before Optimove's notification: part of its sends are due at once, the rest
fall due during the test and wait in the ledger until beat releases them. Each ends with exact counts:
every expected send made exactly once at the fake send service (no duplicate, none before its
ScheduledTime, the right template, attributes and scheduled_time), and Postgres agreeing to the unit
(every `sends` row `sent`, none settled before its scheduled_time, every run `done` with sent = expected).
"""
from __future__ import annotations

import time

import pytest
import requests

from tests.conftest import count, poll
from tests.faults.flows import freeze_holding_work
from tests.faults.support import (API_KEY, assert_sends_exact, create_send_campaign, fire_sends, send_channel_config,
                                  send_ledger, send_runs, send_statuses, start_web, wait_sends_done)
from tests.harness import post_notification, relay_env

pytestmark = pytest.mark.faults

FAST_LIMIT = (1000, 10.0)  # the Optimove limit is not under test here
PAGING_RESUMES_WITHIN = 15.0  # s after a worker restart: its start, RELAY_SWEEP_AFTER 3 s, a sweep, a page


def _env(database_url, redis_url, sim, tmp_path, channels, mode="batch", **extra):
    values = {"OPTIMOVE_API_URL": sim.optimove_url, "OPTIMOVE_API_KEY": API_KEY, "OPTIMOVE_RATE_LIMIT": "1000/10s",
              "RELAY_CHANNEL_CONFIG": send_channel_config(tmp_path, channels),
              "SEND_URL": sim.send_url if mode == "batch" else sim.send_single_url, "SEND_MODE": mode,
              "RELAY_RELEASE_INTERVAL": 1}
    return relay_env(database_url, redis_url, **{**values, **extra})


def _start(procs, env, tmp_path) -> str:
    base = start_web(procs, env)
    procs.worker(env)
    procs.start("beat", ["beat", "--schedule-file", str(tmp_path / "beat")], env)
    return base


def _statuses(db, campaign) -> dict[str, int]:
    return {"waiting": 0, "claimed": 0, "sent": 0, **send_statuses(db, campaign.id)}


def _figures(summary: dict) -> str:
    return (f"calls {summary['calls']}, items sent {summary['items_received']}, applied {summary['applied']}, "
            f"retries {summary['retries']} (max attempts of a send {summary['max_attempts']}), "
            f"late (due after the notification) {summary['late_seconds_future']}")


# -- 1. a redelivered notification ---------------------------------------------------------

def _post_again(base: str, campaign) -> None:
    """Post every channel's EventTypeID 13 again (PascalCase and camelCase): the listener must know it."""
    for index, channel in enumerate(campaign.channels):
        for body in ({"EventTypeID": 13, "TimeStamp": "2026-11-27 10:00:00", "CampaignID": campaign.id,
                      "ChannelID": channel},
                     {"eventTypeId": 13, "timeStamp": "2026-11-27 10:05", "campaignId": str(campaign.id),
                      "channelId": channel}):
            response = post_notification(base, body)
            assert response.status_code == 200, (response.status_code, response.text)
            answer = response.json()
            assert answer["status"] == "duplicate", answer
            assert answer["notification_id"] in campaign.notification_ids, answer


def _replay_past_the_inbox(db, campaign, tag: str) -> list[int]:
    """Store each of the campaign's notifications again under a fresh dedupe key, as received an hour ago and
    never enqueued: the sweeper hands them to the workers, and each opens a second run of its channel that
    pages the whole audience again. Only the sends ledger's unique key stands between it and a double send."""
    with db.cursor() as cur:
        cur.execute("""
            INSERT INTO notifications (event_type, campaign_id, channel_id, dedupe_key, payload, raw_body,
                                       received_at, updated_at)
            SELECT event_type, campaign_id, channel_id, dedupe_key || %s, payload, raw_body,
                   now() - interval '1 hour', now() - interval '1 hour'
            FROM notifications WHERE id = ANY(%s) RETURNING id""", (f":{tag}", list(campaign.notification_ids)))
        return sorted(row[0] for row in cur.fetchall())


def _replay_runs(db, campaign, notification_ids) -> list[dict]:
    return [r for r in send_runs(db, campaign.id) if r["notification_id"] in notification_ids]


def _assert_replay_claimed_nothing(runs: list[dict], customers: int) -> None:
    for run in runs:
        assert run["status"] == "done" and run["fetched"] == customers, run
        assert (run["claimed"], run["sent"], run["duplicates_skipped"]) == (0, 0, customers), run


def _metrics(sim, campaign_id: int) -> dict:
    return requests.get(f"{sim.optimove_url}/_sim/campaign-metrics", params={"campaign_id": campaign_id},
                        timeout=10).json()


def test_redelivered_notification_sends_nothing_twice(procs, make_simulator, redis_url, database_url, db,
                                                      tmp_path, record_property):
    """Optimove posts EventTypeID 13 again: once in the first burst (one body twice), again while sends still
    wait for their time, and again after the run finished. The listener answers `duplicate` with the first
    notification's id each time. Because that dedupe keeps a re-post away from the ledger, each notification
    is also replayed past the inbox (a fresh dedupe key), while sends wait and after the end: the second and
    third runs page the whole audience and must claim, send and report nothing."""
    channels, customers = (610, 611), 900
    sim = make_simulator(rate_limit=FAST_LIMIT)
    env = _env(database_url, redis_url, sim, tmp_path, channels, OPTIMOVE_PAGE_SIZE=200, SEND_BATCH_SIZE=100,
               RELAY_SWEEP_AFTER=3, RELAY_SWEEP_INTERVAL=1, OPTIMOVE_REPORT_METRICS="true")
    base = _start(procs, env, tmp_path)
    started = time.monotonic()
    # the campaign's clock started 10 s ago: about 5/8 of its sends are due, the rest fall due over 30 s
    campaign = create_send_campaign(sim, 717171, channels, customers, start=time.time() - 10, spread=40,
                                    overlap=0.5)
    n = len(campaign.expected)
    fire_sends(base, campaign)
    due_at_fire = campaign.due_by(campaign.fired_at)
    assert 0.55 * n <= due_at_fire <= 0.7 * n

    poll(lambda: _statuses(db, campaign)["sent"] > 0 and _statuses(db, campaign)["waiting"] > 0, 30,
         message="the first sends made while others wait")
    _post_again(base, campaign)
    replayed = _replay_past_the_inbox(db, campaign, "replay-while-waiting")
    replay_runs = poll(lambda: (runs := _replay_runs(db, campaign, replayed)) and len(runs) == len(channels)
                       and all(r["status"] == "done" for r in runs) and runs, 30,
                       message="the replayed notifications' runs done")
    waiting_after_replay = _statuses(db, campaign)["waiting"]
    assert waiting_after_replay > 0, "the replay finished after every send was due; make the spread longer"
    _assert_replay_claimed_nothing(replay_runs, customers)

    wait_sends_done(db, campaign, 60, runs=2 * len(channels))
    reported = poll(lambda: (m := _metrics(sim, campaign.id))["calls"] >= len(channels) and m, 30,
                    message="the metrics reports")
    calls_at_end = send_ledger(sim)["calls"]

    _post_again(base, campaign)
    late = _replay_past_the_inbox(db, campaign, "replay-after-done")
    poll(lambda: (runs := _replay_runs(db, campaign, late)) and len(runs) == len(channels)
         and all(r["status"] == "done" for r in runs), 30, message="the late replay's runs done")
    _assert_replay_claimed_nothing(_replay_runs(db, campaign, late), customers)

    summary = assert_sends_exact(db, sim, campaign, notifications=3 * len(channels), record=record_property)
    assert summary["calls"] == calls_at_end, "a replay after the end called the send service"
    assert count(db, "SELECT count(*) FROM notifications WHERE campaign_id = %s", campaign.id) == 3 * len(channels)
    # one metrics report per original run (the replays sent nothing), and it matches the ledger
    assert _metrics(sim, campaign.id)["calls"] == reported["calls"] == len(channels)
    with db.cursor() as cur:
        cur.execute("SELECT channel_id, template_id, count(*) FROM sends WHERE campaign_id = %s GROUP BY 1, 2",
                    (campaign.id,))
        assert {(m["ChannelID"], m["TemplateID"]): m["MetricValue"] for m in reported["latest"]} == {
            (ch, t): c for ch, t, c in cur.fetchall()}
    print(f"\nredelivery: {n} sends ({due_at_fire} due at the notification), {waiting_after_replay} still waiting "
          f"when the mid-run replay finished; {_figures(summary)}; {time.monotonic() - started:.1f}s")


# -- 2. the worker SIGKILLed mid-run --------------------------------------------------------

def test_worker_sigkilled_mid_send_run_recovers_exactly(procs, make_simulator, private_redis, database_url, db,
                                                        tmp_path, record_property):
    """SIGKILL the only worker (its process group) while pages and send batches are in flight and sends wait.

    Its unacknowledged messages stay invisible for the 120 s visibility timeout, so the beat sweeper must
    re-drive the stale runs and claimed sends from Postgres, and the release job the sends falling due; the
    replayed send calls carry the same idempotency keys.
    """
    channels, customers = (610, 611, 612), 2000
    sim = make_simulator(rate_limit=FAST_LIMIT, send_faults={"latency_ms": 100})
    env = _env(database_url, private_redis, sim, tmp_path, channels, OPTIMOVE_PAGE_SIZE=200, SEND_BATCH_SIZE=100,
               RELAY_VISIBILITY_TIMEOUT=120, RELAY_SWEEP_AFTER=3, RELAY_SWEEP_INTERVAL=1)
    base = _start(procs, env, tmp_path)
    started = time.monotonic()
    campaign = create_send_campaign(sim, 727272, channels, customers, start=time.time() - 10, spread=40)
    n = len(campaign.expected)
    fire_sends(base, campaign)

    poll(lambda: count(db, "SELECT count(*) FROM sends WHERE campaign_id = %s", campaign.id) >= n // 4, 40,
         message="a quarter of the sends claimed")
    # frozen holding a page and a send batch unacknowledged: what the SIGKILL then loses is exactly that
    in_flight, freezes = freeze_holding_work(procs.procs["worker"], private_redis,
                                             until=lambda held: held["relay.fetch_page"] and held["relay.send_batch"])
    procs.kill("worker")
    at_kill = _statuses(db, campaign)
    runs_at_kill = send_runs(db, campaign.id)
    claimed_at_kill = sum(at_kill.values())
    assert in_flight["relay.fetch_page"] > 0 and in_flight["relay.send_batch"] > 0, in_flight
    assert claimed_at_kill < n, "the kill landed after every page was claimed; make the run longer"
    assert any(r["status"] == "running" and not r["fetch_done"] for r in runs_at_kill), runs_at_kill
    assert 0 < at_kill["sent"] < n and at_kill["waiting"] > 0, at_kill
    assert campaign.last_due > time.time() + 5, "no send falls due after the restart; make the spread longer"

    restarted = time.monotonic()
    procs.worker(env, name="worker2")
    # when each run still paging at the kill fetched its next page (the lost page task is re-driven)
    fetched_at_kill = {r["id"]: r["fetched"] for r in runs_at_kill if not r["fetch_done"]}
    resumed: dict[int, float] = {}

    def paging_resumed():
        for r in send_runs(db, campaign.id):
            if r["id"] in fetched_at_kill and r["id"] not in resumed and (
                    r["fetched"] > fetched_at_kill[r["id"]] or r["fetch_done"]):
                resumed[r["id"]] = round(time.monotonic() - restarted, 1)
        return len(resumed) == len(fetched_at_kill)

    poll(paging_resumed, 60, 0.1, "paging of every run resumed")
    wait_sends_done(db, campaign, 60)
    # recovery: until every interrupted run pages again (the rest is waiting for the sends' own times)
    summary = assert_sends_exact(db, sim, campaign, record=record_property, recovery_s=max(resumed.values()))
    print(f"\nSIGKILL with {dict(in_flight)} unacknowledged (caught on freeze {freezes}); {n} sends expected, "
          f"at the kill {claimed_at_kill} claimed ({at_kill}), runs fetched {[r['fetched'] for r in runs_at_kill]}; "
          f"{_figures(summary)}; paging resumed after the restart (s) {resumed}; {time.monotonic() - started:.1f}s")
    # The run whose page task died must page on once the sweeper sees it untouched for RELAY_SWEEP_AFTER (3 s),
    # plus the new worker's start: not only when its last waiting sends have drained.
    assert max(resumed.values()) <= PAGING_RESUMES_WITHIN, (
        f"a run's paging stalled {max(resumed.values())} s after the restart: its lost page task was not re-driven "
        f"while deliveries of its released sends kept touching campaign_runs.updated_at ({resumed})")


# -- 3. the send service failing 30 % of its calls -------------------------------------------

@pytest.mark.parametrize("mode", ["batch", "single"])
def test_send_service_failing_30_percent_of_calls(mode, procs, make_simulator, redis_url, database_url, db,
                                                  tmp_path, record_property):
    """10 % of calls answer 503, 10 % hang past the relay's 1 s timeout (then 503), and 10 % are applied and
    then the connection closes with no reply, so retries carry keys already applied. SEND_MAX_ATTEMPTS is
    high enough that nothing is parked; beat runs the release job and a sweeper with a short age, which
    re-drives sends waiting out a long backoff (alongside their pending retry: same key)."""
    channels = (610, 611) if mode == "batch" else (610,)
    customers = 600 if mode == "batch" else 300
    sim = make_simulator(rate_limit=FAST_LIMIT, send_faults={
        "failure_rate": 0.1, "timeout_rate": 0.1, "drop_after_apply_rate": 0.1, "timeout_sleep_s": 3})
    env = _env(database_url, redis_url, sim, tmp_path, channels, mode, OPTIMOVE_PAGE_SIZE=300, SEND_BATCH_SIZE=25,
               SEND_TIMEOUT=1, SEND_MAX_ATTEMPTS=40, RELAY_SWEEP_AFTER=3, RELAY_SWEEP_INTERVAL=1)
    base = _start(procs, env, tmp_path)
    started = time.monotonic()
    campaign = create_send_campaign(sim, 737373 if mode == "batch" else 747474, channels, customers,
                                    start=time.time() - 10, spread=30)
    n = len(campaign.expected)
    fire_sends(base, campaign)
    due_at_fire = campaign.due_by(campaign.fired_at)
    assert due_at_fire < n

    wait_sends_done(db, campaign, 60)
    summary = assert_sends_exact(db, sim, campaign, record=record_property)
    faults = summary["faults_injected"]
    assert faults["failure"] > 0 and faults["timeout"] > 0 and faults["drop"] > 0, summary
    assert summary["items_received"] > summary["applied"] and summary["retries"] > 0, summary
    failed_calls = faults["failure"] + faults["timeout"] + faults["drop"]
    print(f"\n{mode}: {n} sends ({due_at_fire} due at the notification); faults {faults} = {failed_calls} of "
          f"{summary['calls']} calls ({failed_calls / summary['calls']:.0%}); {_figures(summary)}; "
          f"{time.monotonic() - started:.1f}s")
