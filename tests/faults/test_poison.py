"""A poison notification in every flow: its work crashes the relay on every attempt, alongside healthy work.

Real `relay web`, workers and beat run against the simulator and a Redis of their own, with RELAY_MAX_ATTEMPTS
and OPTIMOVE_MAX_ATTEMPTS at 3 and a sweeper that re-drives untouched work after 2 s. The poison comes from
outside, as in production:

- flows 1, 3 and 4 (paged): the fake Optimove's `corrupt_row` fault puts a NUL character into the CustomerID of
  one row of the poisoned campaign's customer list (a corrupt export: valid JSON, but no Postgres text column
  can hold it), so claiming that page raises on every attempt. The page before it is claimed and delivered;
  the run must be parked `failed` with the error in its reason after bounded attempts (flow 4: before its
  ClearanceRequiredBy, with nothing granted and nothing reported for it, which Optimove reads as false).
- flows 2 and 5 (real-time): an EventTypeID 11 whose CustomerID is 4,000 random characters. The listener
  accepts it (valid JSON, under the body limit) but the ledger's unique index cannot hold a key that long, so
  the notification's flow fails on every delivery; it must be parked `failed` after RELAY_MAX_ATTEMPTS.

In each test a healthy campaign (or burst of triggers) of the same flow runs at the same time and must come
out exact: every grant or send made once at the fake peer (0 lost, 0 duplicates), every acknowledged
notification processed, `campaign_runs` counts equal to the truth.
"""
from __future__ import annotations

import json
import secrets
import threading
import time
from collections import Counter

import pytest
import requests

from cli.supervisor import REALTIME_POOL
from shared import dispatch
from shared.optimove.rows import parse_execution_row
from simulator.campaigns import channel_rows
from simulator.conditional_driver import conditional_spec, optimove_time, run_conditional
from simulator.realtime import run_realtime, trigger_body
from simulator.send_driver import run_send_campaign
from tests.conftest import ADMIN_PASSWORD, TOKEN, count, poll
from tests.faults.support import (API_KEY, create_campaign, create_send_campaign, fire, fire_sends, grant_statuses,
                                  record_figures, runs, send_channel_config, send_runs, send_statuses, start_web,
                                  wait_done)
from tests.harness import post_notification, relay_env

pytestmark = pytest.mark.faults

MAX_ATTEMPTS = 3
PAGE = 100
POISON_ROW = 150  # on the second page: the first page is claimed and delivered, the second never can be
PARKED_WITHIN = 45.0  # s: three attempts with backoff (or three sweeps), on a loaded machine


def _env(database_url, redis_url, sim, **extra) -> dict[str, str]:
    values = {"OPTIMOVE_API_URL": sim.optimove_url, "OPTIMOVE_API_KEY": API_KEY, "OPTIMOVE_RATE_LIMIT": "100/1s",
              "OPTIMOVE_PAGE_SIZE": PAGE, "BONUS_URL": sim.bonus_url, "SEND_URL": sim.send_url,
              "RELAY_MAX_ATTEMPTS": MAX_ATTEMPTS, "OPTIMOVE_MAX_ATTEMPTS": MAX_ATTEMPTS,
              "RELAY_SWEEP_AFTER": 2, "RELAY_SWEEP_INTERVAL": 1, "RELAY_RELEASE_INTERVAL": 1}
    return relay_env(database_url, redis_url, **{**values, **extra})


def _start(procs, env, tmp_path, realtime_workers: int = 0) -> str:
    """web, beat and a worker on every queue; with `realtime_workers`, that many solo workers on the realtime
    queue as `relay up` runs them (then the other worker serves the campaign queues only). Returns once the
    workers are ready."""
    base = start_web(procs, env)
    names = ["worker"]
    if realtime_workers:
        procs.start("worker", ["worker", "--queues", ",".join(dispatch.CAMPAIGN_QUEUES), "--concurrency", "1"], env)
        for i in range(realtime_workers):
            procs.start(f"realtime{i}", ["worker", "--queues", dispatch.REALTIME, *REALTIME_POOL], env)
            names.append(f"realtime{i}")
    else:
        procs.worker(env)
    procs.start("beat", ["beat", "--schedule-file", str(tmp_path / "beat")], env)
    logs = [procs.log_dir / f"{name}.log" for name in names]
    poll(lambda: all(" ready." in log.read_text(errors="replace") for log in logs), 60, 0.2, "workers ready")
    return base


def _corrupt(sim, campaign_id: int, row: int) -> None:
    response = requests.post(f"{sim.optimove_url}/_sim/faults",
                             json={"corrupt_row": {"campaign_id": campaign_id, "row": row}}, timeout=10)
    assert response.status_code == 200, response.text


def _peer_applications(admin_url: str, campaign_id: int, key_of) -> Counter:
    """How often the fake peer applied each ledger key of a campaign (`key_of` picks what identifies it)."""
    entries = requests.get(f"{admin_url}/_sim/ledger", params={"full": 1, "campaign_id": campaign_id},
                           timeout=30).json()["entries"]
    return Counter({key_of(e["key"]): e["applications"] for e in entries if e["applications"]})


def _lost_and_duplicates(expected: set, applied: Counter) -> tuple[int, int]:
    return len(expected - set(applied)), sum(n - 1 for n in applied.values() if n > 1)


def _wait_parked(db, campaign_id: int, n: int, since: float, runs_of=runs) -> tuple[list[dict], float]:
    """Poll until the campaign's `n` runs are `failed` and none of their ledger rows is in flight; return the
    runs (`runs_of`: `runs` or `send_runs`) and how long after `since` they were parked."""
    def parked():
        current = runs_of(db, campaign_id)
        if len(current) == n and all(r["status"] == "failed" for r in current):
            return current
        return None

    poll(parked, PARKED_WITHIN, 0.1, f"the runs of poisoned campaign {campaign_id} parked")
    took = time.monotonic() - since
    poll(lambda: count(db, "SELECT (SELECT count(*) FROM grants WHERE campaign_id = %s AND status = 'claimed') + "
                           "(SELECT count(*) FROM sends WHERE campaign_id = %s AND status IN ('claimed', 'waiting'))",
                       campaign_id, campaign_id) == 0, 30, message="the poisoned campaign's claimed rows settled")
    return runs_of(db, campaign_id), took


def _assert_parked_reason(run: dict) -> None:
    reason = run["last_error"] or ""
    assert f"gave up after {MAX_ATTEMPTS} attempts" in reason, run
    assert f"page at {PAGE}" in reason and "NUL" in reason, run


def _first_page(spec: dict, channel: int) -> list:
    return [parse_execution_row(row) for row in channel_rows(spec, channel, 0, PAGE)]


# -- flow 3: scheduled bonus ---------------------------------------------------------------

def test_flow3_poison_page_parks_its_runs_and_the_other_campaign_is_exact(procs, make_simulator, private_redis,
                                                                         database_url, db, tmp_path,
                                                                         record_property):
    """Flow 3: campaign 880002 (2 bonus channels, 300 customers each) has a NUL in the CustomerID of row 150 of
    every channel's list; campaign 880001 (3 channels, 300 each) is fired alongside it."""
    sim = make_simulator(rate_limit=(1000, 10.0))
    env = _env(database_url, private_redis, sim, BONUS_BATCH_SIZE=100)
    healthy = create_campaign(sim, 880001, (504, 505, 506), customers_per_channel=300)
    poisoned = create_campaign(sim, 880002, (504, 505), customers_per_channel=300)
    _corrupt(sim, poisoned.id, POISON_ROW)
    base = _start(procs, env, tmp_path)

    started = time.monotonic()
    fire(base, poisoned)
    fire(base, healthy)
    wait_done(db, healthy, 90)
    triple = (lambda key: (key[0], key[1], key[2]))
    applied_healthy = _peer_applications(sim.bonus_admin_url, healthy.id, triple)
    lost, duplicates = _lost_and_duplicates(healthy.triples, applied_healthy)
    record_figures(record_property, lost, duplicates)  # the healthy campaign's, before waiting for the poisoned one
    parked, parked_after = _wait_parked(db, poisoned.id, len(poisoned.channels), started)

    # what the poisoned runs could claim: their first page, each (customer, code) once across both channels
    first_pages = {ch: _first_page(poisoned.spec, ch) for ch in poisoned.channels}
    partial = {(poisoned.id, row.customer_id, code) for rows in first_pages.values() for row in rows
               for code in row.promo_codes}
    applied_poisoned = _peer_applications(sim.bonus_admin_url, poisoned.id, triple)
    lost_p, duplicates_p = _lost_and_duplicates(partial, applied_poisoned)
    record_figures(record_property, lost + lost_p, duplicates + duplicates_p, parked_s=round(parked_after, 1))
    print(f"\nflow 3: NUL in row {POISON_ROW} of campaign {poisoned.id}: its {len(parked)} runs parked "
          f"{parked_after:.1f}s after the notifications ({parked[0]['last_error']!r}); its first pages "
          f"{len(applied_poisoned)} of {len(partial)} granted; campaign {healthy.id} alongside: "
          f"{len(applied_healthy)} of {len(healthy.triples)} granted, lost {lost}, duplicates {duplicates}; "
          f"{time.monotonic() - started:.1f}s")

    assert (lost, duplicates) == (0, 0) and set(applied_healthy) == healthy.triples
    assert (lost_p, duplicates_p) == (0, 0) and set(applied_poisoned) == partial
    # the healthy campaign, to the unit
    assert grant_statuses(db, healthy.id) == {"granted": len(healthy.triples)}
    done = runs(db, healthy.id)
    assert {r["channel_id"]: r["fetched"] for r in done} == healthy.customers
    assert all(r["status"] == "done" and r["granted"] == r["claimed"] and r["rejected"] == r["failed"] == 0
               for r in done), done
    assert sum(r["claimed"] for r in done) == len(healthy.triples)
    assert sum(r["claimed"] + r["duplicates_skipped"] for r in done) == healthy.pairs
    # the poisoned one: parked at its second page, with the error; what it claimed granted once
    assert grant_statuses(db, poisoned.id) == {"granted": len(partial)}
    for run in parked:
        _assert_parked_reason(run)
        assert run["fetched"] == PAGE and not run["fetch_done"], run
        pairs = sum(len(row.promo_codes) for row in first_pages[run["channel_id"]])
        assert run["claimed"] + run["duplicates_skipped"] == pairs, run
        assert run["granted"] == run["claimed"] and run["failed"] == 0, run
    assert sum(r["claimed"] for r in parked) == len(partial)
    with db.cursor() as cur:
        cur.execute("SELECT campaign_id, status, count(*) FROM notifications GROUP BY 1, 2")
        assert set(cur.fetchall()) == {(healthy.id, "done", 3), (poisoned.id, "done", 2)}


# -- flow 1: scheduled send ----------------------------------------------------------------

def test_flow1_poison_page_parks_its_run_and_the_other_campaign_is_exact(procs, make_simulator, private_redis,
                                                                         database_url, db, tmp_path,
                                                                         record_property):
    """Flow 1: send campaign 880012 (channel 611, 300 customers, all due) has a NUL in the CustomerID of row 150;
    send campaign 880011 (channels 610 and 611, 300 each, half due, half within 4 s) runs alongside it through
    the send-campaign driver."""
    channels = (610, 611)
    sim = make_simulator(rate_limit=(1000, 10.0))
    env = _env(database_url, private_redis, sim, SEND_BATCH_SIZE=100,
               RELAY_CHANNEL_CONFIG=send_channel_config(tmp_path, channels))
    base = _start(procs, env, tmp_path)
    poisoned = create_send_campaign(sim, 880012, (611,), 300, start=time.time() - 5, spread=1, due_now_fraction=1.0)
    _corrupt(sim, poisoned.id, POISON_ROW)

    started = time.monotonic()
    fire_sends(base, poisoned)
    summary = run_send_campaign(f"{base}/optimove/events?token={TOKEN}", sim.optimove_url, sim.send_admin_url,
                                f"{base}/api/campaigns/{{campaign_id}}", ("admin", ADMIN_PASSWORD), channels=channels,
                                customers_per_channel=300, spread=4, campaign_id=880011, timeout=60)
    record_figures(record_property, summary["missing"], summary["duplicates"])
    [parked], parked_after = _wait_parked(db, poisoned.id, 1, started, send_runs)

    partial = {(611, row.customer_id) for row in _first_page(poisoned.spec, 611)}
    applied_poisoned = _peer_applications(sim.send_admin_url, poisoned.id, lambda key: (key[1], key[2]))
    lost_p, duplicates_p = _lost_and_duplicates(partial, applied_poisoned)
    record_figures(record_property, summary["missing"] + lost_p, summary["duplicates"] + duplicates_p,
                   parked_s=round(parked_after, 1))
    print(f"\nflow 1: NUL in row {POISON_ROW} of send campaign {poisoned.id}: its run parked {parked_after:.1f}s after "
          f"the notification ({parked['last_error']!r}); its first page {len(applied_poisoned)} of {len(partial)} "
          f"sent; campaign 880011 alongside: {summary['sent']} of {summary['expected_sends']} sent, lost "
          f"{summary['missing']}, duplicates {summary['duplicates']}, early {summary['early']}; "
          f"{time.monotonic() - started:.1f}s")

    assert summary["ok"], summary
    assert summary["missing"] == summary["duplicates"] == summary["early"] == 0
    assert (lost_p, duplicates_p) == (0, 0) and set(applied_poisoned) == partial
    assert send_statuses(db, 880011) == {"sent": summary["expected_sends"]}
    done = send_runs(db, 880011)
    assert sorted(r["channel_id"] for r in done) == list(channels)
    for run in done:
        assert run["status"] == "done" and run["fetch_done"] and run["fetched"] == 300, run
        assert run["claimed"] == run["sent"] == 300 and run["rejected"] == run["failed"] == 0, run
    assert send_statuses(db, poisoned.id) == {"sent": len(partial)}
    _assert_parked_reason(parked)
    assert parked["fetched"] == parked["claimed"] == parked["sent"] == PAGE and not parked["fetch_done"], parked
    with db.cursor() as cur:
        cur.execute("SELECT campaign_id, status, count(*) FROM notifications GROUP BY 1, 2")
        assert set(cur.fetchall()) == {(880011, "done", 2), (poisoned.id, "done", 1)}


# -- flow 4: conditional execution ---------------------------------------------------------

def test_flow4_poison_page_parks_its_run_before_the_deadline_and_the_other_campaign_is_exact(
        procs, make_simulator, private_redis, database_url, db, tmp_path, record_property):
    """Flow 4: conditional campaign 880022 (300 customers) has a NUL in the CustomerID of row 150, so its second
    page can never be claimed: its run is parked `failed`, and the 100 customers of its first page, granted,
    are still reported true before the deadline (unreported would mean false to Optimove, though they hold
    the bonus); conditional campaign 880021 (400 customers, every 25th rejected by the bonus system) runs
    alongside it through the conditional driver, both with ClearanceRequiredBy 40 s away."""
    sim = make_simulator(rate_limit=(1000, 10.0))
    env = _env(database_url, private_redis, sim, BONUS_BATCH_SIZE=100)
    base = _start(procs, env, tmp_path)
    poisoned = 880022
    assert requests.post(f"{sim.optimove_url}/_sim/campaigns", json=conditional_spec(poisoned, 300),
                         timeout=10).status_code == 200
    _corrupt(sim, poisoned, POISON_ROW)

    started = time.monotonic()
    now = time.time()
    stamp, _ = optimove_time(now)
    clearance, _ = optimove_time(now + 40)
    response = post_notification(base, {"EventTypeID": 5, "TimeStamp": stamp, "CampaignID": poisoned,
                                        "ClearanceRequiredBy": clearance})
    assert response.status_code == 202, response.text
    summary = run_conditional(f"{base}/optimove/events?token={TOKEN}", sim.optimove_url, sim.bonus_admin_url,
                              customers=400, deadline_in=40, reject_every=25, campaign_id=880021, timeout=10)
    lost = summary["missed"]  # customers to approve that were not approved in time
    record_figures(record_property, lost, summary["duplicate_grants"])
    [parked], parked_after = _wait_parked(db, poisoned, 1, started)
    poll(lambda: runs(db, 880021)[0]["status"] == "done", 30, message="the healthy conditional run done")

    granted_poisoned = _peer_applications(sim.bonus_admin_url, poisoned, tuple)
    first_page = {str(k[1]) for k in granted_poisoned}
    reported = poll(lambda: (r := requests.get(f"{sim.optimove_url}/_sim/promotion-status",
                                               params={"campaign_id": poisoned}, timeout=10).json())["reported"]
                    >= len(first_page) and r, 30, message="the parked run's grants reported")
    record_figures(record_property, lost, summary["duplicate_grants"], parked_s=round(parked_after, 1))
    margin = count(db, "SELECT EXTRACT(EPOCH FROM deadline - finished_at)::float8 FROM campaign_runs "
                       "WHERE campaign_id = %s", poisoned)
    print(f"\nflow 4: NUL in row {POISON_ROW} of conditional campaign {poisoned}: its run parked {parked_after:.1f}s after the "
          f"notification, {margin:.0f}s before its deadline ({parked['last_error']!r}); granted "
          f"{len(granted_poisoned)}, reported {reported['reported']}; "
          f"campaign 880021 alongside: approved {summary['approved_before_deadline']} of "
          f"{summary['expected_approved']} before the deadline, false {summary['reported_false']}, lost {lost}, "
          f"duplicates {summary['duplicate_grants']}; {time.monotonic() - started:.1f}s")

    assert summary["ok"], json.dumps({k: v for k, v in summary.items() if not isinstance(v, list)})
    assert summary["approved_before_deadline"] == summary["expected_approved"] == 384
    assert summary["reported_false"] == 16 and summary["unreported"] == 0
    assert summary["approved_after_deadline"] == summary["grants_after_deadline"] == summary["duplicate_grants"] == 0
    with db.cursor() as cur:
        cur.execute("SELECT status, fetched, claimed, granted, rejected, reported_true, reported_false, expired "
                    "FROM campaign_runs WHERE campaign_id = 880021")
        granted = summary["grants_applied"]  # 400 customers, every 2nd with both codes: 600 codes; 16 rejected
        assert cur.fetchall() == [("done", 400, granted + 16, granted, 16, 384, 16, 0)] and granted == 600
        cur.execute("SELECT campaign_id, status, count(*) FROM notifications GROUP BY 1, 2")
        assert set(cur.fetchall()) == {(880021, "done", 1), (poisoned, "done", 1)}
    assert parked["last_error"] and f"gave up after {MAX_ATTEMPTS} attempts" in parked["last_error"], parked
    assert f"page at {PAGE}" in parked["last_error"] and "NUL" in parked["last_error"], parked
    assert parked["fetched"] == PAGE and margin > 0, parked
    # the first page: claimed, granted once each, and every one of its customers reported true in time
    assert len(first_page) == PAGE and set(granted_poisoned.values()) == {1}, granted_poisoned
    assert parked["claimed"] == parked["granted"] == len(granted_poisoned), parked
    assert count(db, "SELECT count(*) FROM grants WHERE campaign_id = %s AND status = 'granted'",
                 poisoned) == len(granted_poisoned)
    assert reported["reported"] == reported["true"] == PAGE, {k: v for k, v in reported.items() if k != "statuses"}
    assert set(reported["statuses"]) == first_page and all(reported["statuses"].values())
    assert reported["calls"] and all(call["at"] <= now + 40 for call in reported["calls"])  # before the deadline


# -- flows 5 and 2: real-time bonus and real-time send --------------------------------------

@pytest.mark.parametrize("role", ["bonus", "send"], ids=["flow5_bonus", "flow2_send"])
def test_realtime_poison_trigger_is_parked_and_the_other_triggers_are_exact(role, procs, make_simulator, private_redis,
                                                                            database_url, db, tmp_path,
                                                                            record_property):
    """Flows 5 and 2: one EventTypeID 11 with a 4,000-character random CustomerID (over the ledger index's
    limit) arrives into a burst of 15 healthy triggers (5/s for 3 s, every 5th re-sent) on the same
    campaign and channel; two real-time workers (solo, as `relay up`), a campaign worker and beat."""
    channel = {"bonus": 600, "send": 610}[role]
    config = tmp_path / "channels.json"
    config.write_text(json.dumps({"channels": {"600": {"role": "bonus", "events": [11]},
                                               "610": {"role": "send", "events": [11]}}}))
    sim = make_simulator(rate_limit=(1000, 10.0))
    env = _env(database_url, private_redis, sim, RELAY_CHANNEL_CONFIG=config)
    base = _start(procs, env, tmp_path, realtime_workers=2)
    campaign_id = 880030 + channel
    admin = sim.bonus_admin_url if role == "bonus" else sim.send_admin_url

    summary: dict = {}
    started = time.monotonic()
    driver = threading.Thread(target=lambda: summary.update(run_realtime(
        f"{base}/optimove/events?token={TOKEN}", admin, role, channel, campaign_id=campaign_id, rate=5.0,
        duration=3.0, duplicate_every=5, timeout=60)))
    driver.start()
    poll(lambda: count(db, "SELECT count(*) FROM notifications") >= 3, 30, message="the burst under way")
    giant = f"poison-{secrets.token_urlsafe(3000)}"
    body, _ = trigger_body(role, 0, campaign_id, channel, giant, time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime()))
    response = post_notification(base, body)
    assert response.status_code == 202, response.text
    poison_id = response.json()["notification_id"]
    driver.join(120)
    assert not driver.is_alive(), "the driver did not finish"
    record_figures(record_property, summary["lost"], summary["duplicate_effects"])

    def parked():
        with db.cursor() as cur:
            cur.execute("SELECT status, attempts, last_error FROM notifications WHERE id = %s", (poison_id,))
            row = cur.fetchone()
        return row if row[0] == "failed" else None

    status, attempts, reason = poll(parked, PARKED_WITHIN, 0.1, "the poison trigger parked")
    parked_after = time.monotonic() - started
    table, done = ("grants", "granted") if role == "bonus" else ("sends", "sent")
    poll(lambda: count(db, f"SELECT count(*) FROM {table} WHERE status = 'claimed'") == 0, 30,
         message="every ledger row settled")
    index = 1 if role == "bonus" else 2
    touched_poison = _peer_applications(admin, campaign_id, lambda key: key[index])[giant]
    record_property("parked_s", round(parked_after, 1))
    print(f"\nflow {5 if role == 'bonus' else 2}: a trigger with a 4,000-character CustomerID parked after "
          f"{attempts - 1} attempts ({reason.splitlines()[0][:140]!r}), {parked_after:.1f}s after the burst began; "
          f"{summary['accepted']} "
          f"healthy triggers alongside: {summary['effects_seen']} of {summary['expected_effects']} effects at the "
          f"{'bonus system' if role == 'bonus' else 'send service'}, lost {summary['lost']}, duplicates "
          f"{summary['duplicate_effects']}, latency p99 {summary['latency_ms']['p99']} ms")

    assert summary["accepted"] == 15 and summary["errors"] == {}, summary
    assert summary["lost"] == 0 and summary["duplicate_effects"] == 0 and summary["ok"], summary
    assert (status, attempts) == ("failed", MAX_ATTEMPTS + 1)
    # the reason names the cause: Postgres refusing the ledger key, not "database unavailable"
    assert reason.startswith(f"gave up after {MAX_ATTEMPTS} attempts: ProgramLimitExceeded: index row size"), reason
    assert touched_poison == 0
    assert count(db, f"SELECT count(*) FROM {table} WHERE notification_id = %s", poison_id) == 0
    assert count(db, f"SELECT count(*) FROM {table} WHERE status <> %s", done) == 0
    assert count(db, f"SELECT count(*) FROM {table}") == summary["expected_effects"]
    with db.cursor() as cur:
        cur.execute("SELECT status, count(*) FROM notifications GROUP BY 1")
        assert dict(cur.fetchall()) == {"done": 15, "failed": 1}
