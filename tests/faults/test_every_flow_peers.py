"""Flows 1, 2, 4 and 5 against slow and bursty peers (flow 3 has its own: test_slow_peers.py).

Real `relay web`, workers and beat run against the simulator and a Redis of their own; the drivers fire the
notifications and check the fake peers. Each test ends on the invariants: every expected grant or send made
exactly once at the fake peer (0 lost, 0 duplicates), every acknowledged notification processed, and
`campaign_runs` counts equal to the truth where the flow has runs.

- The bonus system or send service answering in 2 s per call and failing every call (503) for two bursts of 4 s,
  3 s apart, from the moment the first call lands: flows 1 (send service), 2 (send service, real time),
  4 (bonus system; its report to Optimove must still be right and before ClearanceRequiredBy) and 5 (bonus
  system, real time).
- The Optimove API answering 429 and 500 in bursts, on the customer-list pages and on the call that reports
  back (flow 1: UpdateCampaignMetrics; flow 4: UpdateCustomerPromotionStatus, still before the deadline).
  Flows 2 and 5 never call Optimove: a real-time trigger (EventTypeID 11) carries its customer, promo codes,
  template and attributes, so those flows neither page a customer list nor report anything back, and an
  Optimove fault cannot reach them; they have no test here.
"""
from __future__ import annotations

import json
import threading
import time

import pytest
import requests

from cli.supervisor import REALTIME_POOL
from shared import dispatch
from simulator.conditional_driver import run_conditional
from simulator.realtime import run_realtime
from simulator.send_driver import run_send_campaign
from tests.conftest import TOKEN, count, poll
from tests.faults.support import (API_KEY, optimove_stats, record_figures, runs, send_channel_config, send_runs,
                                  start_web)
from tests.harness import relay_env

pytestmark = pytest.mark.faults

FAST_LIMIT = (1000, 10.0)  # the fake's limit is not under test here; the relay keeps to 100/1 s
BURSTS, BURST_S, BETWEEN_S = 2, 4.0, 3.0
LATENCY_MS = 2000


def _env(database_url, redis_url, sim, **extra) -> dict[str, str]:
    values = {"OPTIMOVE_API_URL": sim.optimove_url, "OPTIMOVE_API_KEY": API_KEY, "OPTIMOVE_RATE_LIMIT": "100/1s",
              "BONUS_URL": sim.bonus_url, "SEND_URL": sim.send_url, "BONUS_TIMEOUT": 5, "SEND_TIMEOUT": 5,
              "RELAY_RELEASE_INTERVAL": 1, "RELAY_SWEEP_AFTER": 5, "RELAY_SWEEP_INTERVAL": 1}
    return relay_env(database_url, redis_url, **{**values, **extra})


def _start(procs, env, tmp_path, concurrency: int = 4, realtime_workers: int = 0) -> str:
    """web, beat and a campaign worker (every queue; with `realtime_workers`, all but `realtime`, which that
    many solo workers serve as under `relay up`); returns the listener URL once the workers are ready."""
    base = start_web(procs, env)
    names = ["worker"]
    if realtime_workers:
        queues = ",".join(dispatch.CAMPAIGN_QUEUES)
        procs.start("worker", ["worker", "--queues", queues, "--concurrency", str(concurrency)], env)
        for i in range(realtime_workers):
            procs.start(f"realtime{i}", ["worker", "--queues", dispatch.REALTIME, *REALTIME_POOL], env)
            names.append(f"realtime{i}")
    else:
        procs.worker(env, concurrency=concurrency)
    procs.start("beat", ["beat", "--schedule-file", str(tmp_path / "beat")], env)
    logs = [procs.log_dir / f"{name}.log" for name in names]
    poll(lambda: all(" ready." in log.read_text(errors="replace") for log in logs), 60, 0.2, "workers ready")
    return f"{base}/optimove/events?token={TOKEN}"


def _in_thread(fn, **kwargs) -> tuple[threading.Thread, dict]:
    """Run a driver in a thread; its summary lands in the returned dict."""
    summary: dict = {}
    thread = threading.Thread(target=lambda: summary.update(fn(**kwargs)), daemon=True)
    thread.start()
    return thread, summary


def _failing_bursts(peer) -> list[int]:
    """Make every call to `peer` fail (503) for BURST_S, BURSTS times, BETWEEN_S apart; return the calls
    refused in each burst."""
    refused = []
    for number in range(BURSTS):
        if number:
            time.sleep(BETWEEN_S)  # the peer recovers between bursts (the fault's schedule)
        before = peer.summary()["faults_injected"].get("failure", 0)
        peer.configure({"failure_rate": 1.0})
        time.sleep(BURST_S)  # the burst itself (fault injection, not synchronisation)
        peer.configure({"failure_rate": 0.0})
        refused.append(peer.summary()["faults_injected"].get("failure", 0) - before)
    return refused


def _notifications(db) -> dict[str, int]:
    with db.cursor() as cur:
        cur.execute("SELECT status, count(*) FROM notifications GROUP BY 1")
        return dict(cur.fetchall())


def _runs_done(db, campaign_id: int, n: int, runs_of=runs) -> list[dict]:
    def done():
        current = runs_of(db, campaign_id)
        assert not [r for r in current if r["status"] not in ("running", "done")], current
        return current if len(current) == n and all(r["status"] == "done" for r in current) else None

    return poll(done, 60, 0.1, f"the runs of campaign {campaign_id} done")


def _sends_per_template(db, campaign_id: int) -> dict[tuple[int, int], int]:
    with db.cursor() as cur:
        cur.execute("SELECT channel_id, template_id, count(*) FROM sends WHERE campaign_id = %s GROUP BY 1, 2",
                    (campaign_id,))
        return {(channel, template): n for channel, template, n in cur.fetchall()}


def _assert_send_runs(db, campaign_id: int, channels, customers: int) -> None:
    """Every send of the campaign `sent`, every run `done` with counts equal to its audience."""
    total = len(channels) * customers
    with db.cursor() as cur:
        cur.execute("SELECT status, count(*) FROM sends WHERE campaign_id = %s GROUP BY 1", (campaign_id,))
        assert dict(cur.fetchall()) == {"sent": total}
    current = send_runs(db, campaign_id)
    assert sorted(r["channel_id"] for r in current) == sorted(channels), current
    for run in current:
        assert run["status"] == "done" and run["fetch_done"] and run["fetched"] == customers, run
        assert run["claimed"] == run["sent"] == customers and run["duplicates_skipped"] == 0, run
        assert run["rejected"] == run["failed"] == 0, run


def _assert_conditional_run(db, campaign_id: int, summary: dict) -> dict:
    """The run `done` with its counts equal to what the fake peers saw."""
    run = _runs_done(db, campaign_id, 1)[0]
    with db.cursor() as cur:
        cur.execute("SELECT status, fetched, claimed, granted, rejected, failed, expired, reported_true, "
                    "reported_false FROM campaign_runs WHERE campaign_id = %s", (campaign_id,))
        row = dict(zip(("status", "fetched", "claimed", "granted", "rejected", "failed", "expired", "reported_true",
                        "reported_false"), cur.fetchone()))
        cur.execute("SELECT status, count(*) FROM grants WHERE campaign_id = %s GROUP BY 1", (campaign_id,))
        grants = dict(cur.fetchall())
    rejected = summary["expected_false"]  # each of them holds one code the bonus system rejects
    assert row == {"status": "done", "fetched": summary["customers"], "claimed": summary["grants_applied"] + rejected,
                   "granted": summary["grants_applied"], "rejected": rejected, "failed": 0, "expired": 0,
                   "reported_true": summary["expected_approved"], "reported_false": rejected}, (row, run)
    assert grants == {"granted": summary["grants_applied"], "rejected": rejected}, grants
    return row


def _assert_conditional_summary(summary: dict) -> None:
    assert summary["ok"], json.dumps({k: v for k, v in summary.items() if not isinstance(v, list)})
    assert summary["approved_before_deadline"] == summary["expected_approved"] > 0, summary
    assert summary["reported_false"] == summary["expected_false"] and summary["unreported"] == 0, summary
    assert summary["approved_after_deadline"] == summary["grants_after_deadline"] == 0, summary
    assert summary["report_calls_after_deadline"] == 0 and summary["approved_without_grant"] == 0, summary


def _last_report_margin(sim, summary: dict) -> float:
    """Seconds between the last UpdateCustomerPromotionStatus call and ClearanceRequiredBy (-inf: no call)."""
    status = requests.get(f"{sim.optimove_url}/_sim/promotion-status",
                          params={"campaign_id": summary["campaign_id"], "customers": 0}, timeout=10).json()
    return summary["deadline"] - max((call["at"] for call in status["calls"]), default=float("inf"))


# -- 1. slow peers failing in bursts ---------------------------------------------------------

def test_flow1_send_service_2s_per_call_and_failing_in_bursts(procs, make_simulator, private_redis, database_url, db,
                                                              tmp_path, record_property):
    """Flow 1: every send-service call takes 2 s; from the first send on, every call fails (503) for 4 s, twice,
    3 s apart. Send campaign: channels 610 and 611, 200 customers each, half due at once and the rest over the
    next 8 s; batches of 25, a worker of 4 processes."""
    channels, customers, campaign_id = (610, 611), 200, 920001
    sim = make_simulator(rate_limit=FAST_LIMIT, send_faults={"latency_ms": LATENCY_MS})
    env = _env(database_url, private_redis, sim, RELAY_CHANNEL_CONFIG=send_channel_config(tmp_path, channels),
               OPTIMOVE_PAGE_SIZE=100, SEND_BATCH_SIZE=25)
    listener = _start(procs, env, tmp_path)

    started = time.monotonic()
    driver, summary = _in_thread(run_send_campaign, listener_url=listener, optimove_url=sim.optimove_url,
                                 send_admin_url=sim.send_admin_url, channels=channels,
                                 customers_per_channel=customers, spread=8, campaign_id=campaign_id, timeout=90)
    poll(lambda: sim.send.summary()["applied"] > 0, 60, 0.05, "the first sends at the send service")
    sent_at_burst = sim.send.summary()["applied"]
    assert sent_at_burst < len(channels) * customers, "every send landed before the bursts; make the campaign longer"
    refused = _failing_bursts(sim.send)
    ended = time.monotonic()
    driver.join(150)
    assert not driver.is_alive(), "the send-campaign driver did not finish"
    record_figures(record_property, summary["missing"], summary["duplicates"])
    _runs_done(db, campaign_id, len(channels), send_runs)
    recovery = time.monotonic() - ended
    record_property("recovery_s", round(recovery, 1))
    ledger = sim.send.summary()
    print(f"\nflow 1: 2 s per send call, every call failing for {BURSTS} x {BURST_S:.0f} s ({refused} calls refused) "
          f"from {sent_at_burst} of {summary['expected_sends']} sent; done {recovery:.1f}s after the last burst; "
          f"sent {summary['sent']}, lost {summary['missing']}, duplicates {summary['duplicates']}, early "
          f"{summary['early']}; calls {ledger['calls']}, items {ledger['items_received']}; "
          f"{time.monotonic() - started:.1f}s in all")

    assert summary["ok"], summary
    assert summary["missing"] == summary["duplicates"] == summary["early"] == 0
    assert summary["sent"] == summary["expected_sends"] == len(channels) * customers
    assert refused[0] > 0 and ledger["faults_injected"]["failure"] == sum(refused), (refused, ledger)
    assert ledger["applied"] == ledger["unique_keys"] == summary["expected_sends"], ledger
    _assert_send_runs(db, campaign_id, channels, customers)
    assert _notifications(db) == {"done": len(channels)}


@pytest.mark.parametrize("role", ["bonus", "send"], ids=["flow5_bonus", "flow2_send"])
def test_realtime_peer_2s_per_call_and_failing_in_bursts(role, procs, make_simulator, private_redis, database_url, db,
                                                         tmp_path, record_property):
    """Flows 5 and 2: every bonus-system (flow 5) or send-service (flow 2) call takes 2 s; from the first call on,
    every call fails (503) for 4 s, twice, 3 s apart, while 12 EventTypeID 11 triggers arrive (3/s for 4 s, every
    4th re-sent). Four solo real-time workers as under `relay up`, the default attempt budget."""
    channel = {"bonus": 600, "send": 610}[role]
    config = tmp_path / "channels.json"
    config.write_text(json.dumps({"channels": {"600": {"role": "bonus", "events": [11]},
                                               "610": {"role": "send", "events": [11]}}}))
    sim = make_simulator(rate_limit=FAST_LIMIT)
    peer, admin = (sim.bonus, sim.bonus_admin_url) if role == "bonus" else (sim.send, sim.send_admin_url)
    peer.configure({"latency_ms": LATENCY_MS})
    env = _env(database_url, private_redis, sim, RELAY_CHANNEL_CONFIG=config)
    listener = _start(procs, env, tmp_path, concurrency=1, realtime_workers=4)

    started = time.monotonic()
    driver, summary = _in_thread(run_realtime, listener_url=listener, admin_url=admin, role=role, channel_id=channel,
                                 campaign_id=920010 + channel, rate=3.0, duration=4.0, duplicate_every=4, timeout=120)
    poll(lambda: peer.summary()["applied"] > 0, 60, 0.05, "the first real-time call at the peer")
    refused = _failing_bursts(peer)
    ended = time.monotonic()
    driver.join(180)
    assert not driver.is_alive(), "the real-time driver did not finish"
    record_figures(record_property, summary["lost"], summary["duplicate_effects"])
    table, done = ("grants", "granted") if role == "bonus" else ("sends", "sent")
    poll(lambda: count(db, f"SELECT count(*) FROM {table} WHERE status = 'claimed'") == 0, 30,
         message="every ledger row settled")
    recovery = time.monotonic() - ended
    record_property("recovery_s", round(recovery, 1))
    print(f"\nflow {5 if role == 'bonus' else 2}: 2 s per {'bonus' if role == 'bonus' else 'send'} call, every call "
          f"failing for {BURSTS} x {BURST_S:.0f} s ({refused} calls refused); {summary['accepted']} triggers, "
          f"{summary['effects_seen']} of {summary['expected_effects']} effects, lost {summary['lost']}, duplicates "
          f"{summary['duplicate_effects']}; done {recovery:.1f}s after the last burst; latency p50 "
          f"{summary['latency_ms']['p50']} ms, max {summary['latency_ms']['max']} ms; "
          f"{time.monotonic() - started:.1f}s in all")

    assert summary["accepted"] == 12 and summary["errors"] == {}, summary
    assert summary["lost"] == 0 and summary["duplicate_effects"] == 0 and summary["ok"], summary
    assert refused[0] > 0, refused
    assert count(db, f"SELECT count(*) FROM {table} WHERE status <> %s", done) == 0
    assert count(db, f"SELECT count(*) FROM {table}") == summary["expected_effects"]
    assert peer.summary()["applied"] == summary["expected_effects"]
    assert _notifications(db) == {"done": 12}


def test_flow4_bonus_system_2s_per_call_and_failing_in_bursts(procs, make_simulator, private_redis, database_url, db,
                                                              tmp_path, record_property):
    """Flow 4: every bonus-system call takes 2 s; from the first grant on, every call fails (503) for 4 s, twice,
    3 s apart. Conditional campaign of 600 customers (every 25th holds a code the bonus system rejects),
    ClearanceRequiredBy 60 s after EventTypeID 5; batches of 50, a worker of 4 processes."""
    campaign_id = 920004
    sim = make_simulator(rate_limit=FAST_LIMIT, latency_ms=LATENCY_MS)
    env = _env(database_url, private_redis, sim, OPTIMOVE_PAGE_SIZE=200, BONUS_BATCH_SIZE=50)
    listener = _start(procs, env, tmp_path)

    started = time.monotonic()
    driver, summary = _in_thread(run_conditional, listener_url=listener, optimove_url=sim.optimove_url,
                                 bonus_admin_url=sim.bonus_admin_url, customers=600, deadline_in=60, reject_every=25,
                                 campaign_id=campaign_id, timeout=10)
    poll(lambda: sim.bonus.summary()["applied"] > 0, 60, 0.05, "the first grants at the bonus system")
    granted_at_burst = sim.bonus.summary()["applied"]
    refused = _failing_bursts(sim.bonus)
    ended = time.monotonic()
    driver.join(150)
    assert not driver.is_alive(), "the conditional driver did not finish"
    recovery = time.monotonic() - ended  # every customer reported
    lost = summary["missed"]  # customers to approve that were not approved in time
    record_figures(record_property, lost, summary["duplicate_grants"])
    record_property("recovery_s", round(recovery, 1))
    margin = _last_report_margin(sim, summary)
    print(f"\nflow 4: 2 s per bonus call, every call failing for {BURSTS} x {BURST_S:.0f} s ({refused} calls refused) "
          f"from {granted_at_burst} grants; all {summary['customers']} reported {recovery:.1f}s after the last burst, "
          f"the last report {margin:.1f}s before ClearanceRequiredBy; approved {summary['approved_before_deadline']} "
          f"of {summary['expected_approved']}, false {summary['reported_false']}, lost {lost}, duplicates "
          f"{summary['duplicate_grants']}; {summary['report_calls']} report calls; {time.monotonic() - started:.1f}s "
          f"in all")

    _assert_conditional_summary(summary)
    assert granted_at_burst < summary["grants_applied"], "every grant landed before the bursts"
    assert refused[0] > 0, refused
    assert margin > 0
    _assert_conditional_run(db, campaign_id, summary)
    assert _notifications(db) == {"done": 1}


# -- 2. Optimove answering 429 and 500 in bursts ----------------------------------------------

def _optimove_bursts(sim, pages: str, report: str) -> None:
    """429 and 500 bursts: on the customer-list pages, 2 x 429 after every 4 calls let through and 2 x 500 after
    every 5 (the first 500s after 2); on the report call, its first try answered 429, its second 500, then
    every second call one or the other."""
    faults = {"burst_429": [{"every": 4, "length": 2, "functions": [pages]},
                            {"every": 2, "length": 1, "skip": 0, "functions": [report]}],
              "burst_500": [{"every": 5, "length": 2, "skip": 2, "functions": [pages]},
                            {"every": 2, "length": 1, "skip": 0, "functions": [report]}]}
    response = requests.post(f"{sim.optimove_url}/_sim/faults", json=faults, timeout=10)
    assert response.status_code == 200, response.text


def _assert_bursts_hit(stats: dict, *functions: str) -> None:
    for function in functions:
        assert stats["throttled_by_function"].get(function, 0) > 0, (function, stats)
        assert stats["injected_errors_by_function"].get(function, 0) > 0, (function, stats)


def _burst_figures(stats: dict, *functions: str) -> str:
    return "; ".join(f"{f}: {stats['throttled_by_function'].get(f, 0)} x 429, "
                     f"{stats['injected_errors_by_function'].get(f, 0)} x 500, "
                     f"{stats['requests_by_function'].get(f, 0)} accepted" for f in functions)


def test_flow1_optimove_429_and_500_in_bursts(procs, make_simulator, private_redis, database_url, db, tmp_path,
                                              record_property):
    """Flow 1: Optimove answers GetCustomerSendDetailsByChannel 429 twice after every 4 calls let through and 500
    twice after every 5, and UpdateCampaignMetrics 429 on its first try, 500 on its second, then every other call.
    Send campaign: channels 610 and 611, 300 customers each, pages of 100, half due at once, the rest within 4 s;
    the metrics of each run reported when it completes (OPTIMOVE_REPORT_METRICS)."""
    channels, customers, campaign_id = (610, 611), 300, 920101
    pages, report = "GetCustomerSendDetailsByChannel", "UpdateCampaignMetrics"
    sim = make_simulator(rate_limit=FAST_LIMIT)
    _optimove_bursts(sim, pages, report)
    env = _env(database_url, private_redis, sim, RELAY_CHANNEL_CONFIG=send_channel_config(tmp_path, channels),
               OPTIMOVE_PAGE_SIZE=100, SEND_BATCH_SIZE=100, OPTIMOVE_REPORT_METRICS="true")
    listener = _start(procs, env, tmp_path, concurrency=2)

    started = time.monotonic()
    summary = run_send_campaign(listener, sim.optimove_url, sim.send_admin_url, channels=channels,
                                customers_per_channel=customers, spread=4, campaign_id=campaign_id, timeout=90)
    record_figures(record_property, summary["missing"], summary["duplicates"])
    _runs_done(db, campaign_id, len(channels), send_runs)
    metrics_url = f"{sim.optimove_url}/_sim/campaign-metrics"
    reported = poll(lambda: (m := requests.get(metrics_url, params={"campaign_id": campaign_id}, timeout=10).json())
                    ["calls"] >= len(channels) and m, 60, 0.1, "both runs' metrics reported")
    done_at = time.time()
    stats = optimove_stats(sim)
    recovery = done_at - stats["last_fault_at"]
    record_property("recovery_s", round(recovery, 1))
    print(f"\nflow 1: Optimove bursts ({_burst_figures(stats, pages, report)}); sent {summary['sent']} of "
          f"{summary['expected_sends']}, lost {summary['missing']}, duplicates {summary['duplicates']}, early "
          f"{summary['early']}; metrics reported in {reported['calls']} calls; done {recovery:.1f}s after the last "
          f"fault; {time.monotonic() - started:.1f}s in all")

    assert summary["ok"], summary
    assert summary["missing"] == summary["duplicates"] == summary["early"] == 0
    assert summary["sent"] == summary["expected_sends"] == len(channels) * customers
    _assert_bursts_hit(stats, pages, report)
    _assert_send_runs(db, campaign_id, channels, customers)
    assert reported["calls"] == len(channels), reported  # one report per run, however often it was refused
    assert {(m["ChannelID"], m["TemplateID"]): m["MetricValue"] for m in reported["latest"]} == \
        _sends_per_template(db, campaign_id)
    assert count(db, "SELECT count(*) FROM campaign_runs WHERE campaign_id = %s AND metrics_reported_at IS NOT NULL "
                     "AND metrics_error IS NULL", campaign_id) == len(channels)
    assert _notifications(db) == {"done": len(channels)}


def test_flow4_optimove_429_and_500_in_bursts(procs, make_simulator, private_redis, database_url, db, tmp_path,
                                              record_property):
    """Flow 4: Optimove answers GetProcessedCampaignCustomers 429 twice after every 4 calls let through and 500
    twice after every 5, and UpdateCustomerPromotionStatus 429 on its first try, 500 on its second, then every
    other call. Conditional campaign of 1,000 customers (every 25th rejected by the bonus system), pages of 100,
    ClearanceRequiredBy 40 s after EventTypeID 5."""
    campaign_id = 920104
    pages, report = "GetProcessedCampaignCustomers", "UpdateCustomerPromotionStatus"
    sim = make_simulator(rate_limit=FAST_LIMIT)
    _optimove_bursts(sim, pages, report)
    env = _env(database_url, private_redis, sim, OPTIMOVE_PAGE_SIZE=100, BONUS_BATCH_SIZE=200)
    listener = _start(procs, env, tmp_path, concurrency=2)

    started = time.monotonic()
    summary = run_conditional(listener, sim.optimove_url, sim.bonus_admin_url, customers=1000, deadline_in=40,
                              reject_every=25, campaign_id=campaign_id, timeout=10)
    done_at = time.time()
    stats = optimove_stats(sim)
    recovery = done_at - stats["last_fault_at"]
    lost = summary["missed"]  # customers to approve that were not approved in time
    record_figures(record_property, lost, summary["duplicate_grants"])
    record_property("recovery_s", round(recovery, 1))
    margin = _last_report_margin(sim, summary)
    print(f"\nflow 4: Optimove bursts ({_burst_figures(stats, pages, report)}); approved "
          f"{summary['approved_before_deadline']} of {summary['expected_approved']}, false "
          f"{summary['reported_false']}, lost {lost}, duplicates {summary['duplicate_grants']}; "
          f"{summary['report_calls']} report calls landed, the last {margin:.1f}s before ClearanceRequiredBy; "
          f"done {recovery:.1f}s after the last fault; {time.monotonic() - started:.1f}s in all")

    _assert_conditional_summary(summary)
    _assert_bursts_hit(stats, pages, report)
    assert margin > 0
    _assert_conditional_run(db, campaign_id, summary)
    assert _notifications(db) == {"done": 1}
