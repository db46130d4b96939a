"""Real-time triggers (flows 5 and 2) while the peer is down: nothing lost, nothing twice.

Real `relay web`, a dedicated real-time worker (`relay worker --queues realtime --pool threads`) and beat run
against the simulator. The fake bonus system (or send service) answers 503 to every call for
20 s while a burst of EventTypeID 11 notifications arrives, with the relay's default attempt
budget. After it comes back, every acknowledged notification must have its effect exactly once
at the peer, and Postgres must agree to the unit.
"""
from __future__ import annotations

import json
import threading
import time

import pytest

from cli.supervisor import REALTIME_POOL
from shared import dispatch
from simulator.realtime import run_realtime
from tests.conftest import TOKEN, count, poll
from tests.faults.support import API_KEY, record_figures, start_web
from tests.harness import relay_env

pytestmark = pytest.mark.faults

CHANNELS = {"bonus": 600, "send": 610}
OUTAGE_S = 20.0
RATE, DURATION = 10.0, 5.0


@pytest.mark.parametrize("role", ["bonus", "send"])
def test_peer_down_20s_during_a_realtime_burst(role, procs, make_simulator, private_redis, database_url, db,
                                               tmp_path, record_property):
    sim = make_simulator(rate_limit=(1000, 10.0))
    channels = tmp_path / "channels.json"
    channels.write_text(json.dumps({"channels": {str(CHANNELS["bonus"]): {"role": "bonus", "events": [11]},
                                                 str(CHANNELS["send"]): {"role": "send", "events": [11]}}}))
    env = relay_env(database_url, private_redis, OPTIMOVE_API_URL=sim.optimove_url, OPTIMOVE_API_KEY=API_KEY,
                    BONUS_URL=sim.bonus_url, SEND_URL=sim.send_url, RELAY_CHANNEL_CONFIG=channels,
                    RELAY_SWEEP_AFTER=5, RELAY_SWEEP_INTERVAL=1)
    base = start_web(procs, env)
    procs.start("realtime", ["worker", "--queues", dispatch.REALTIME, *REALTIME_POOL], env)  # as `relay up`
    procs.start("beat", ["beat", "--schedule-file", str(tmp_path / "beat")], env)
    peer, admin = (sim.bonus, sim.bonus_admin_url) if role == "bonus" else (sim.send, sim.send_admin_url)

    peer.configure({"failure_rate": 1.0})
    down_at = time.monotonic()
    summary: dict = {}
    driver = threading.Thread(target=lambda: summary.update(run_realtime(
        f"{base}/optimove/events?token={TOKEN}", admin, role, CHANNELS[role], campaign_id=777000 + len(role),
        rate=RATE, duration=DURATION, duplicate_every=5, timeout=180)))
    driver.start()
    poll(lambda: peer.summary()["faults_injected"]["failure"] >= RATE * DURATION, 60,
         message="the relay's first calls refused by the peer")
    time.sleep(max(0.0, OUTAGE_S - (time.monotonic() - down_at)))  # the outage lasts 20 s in all
    refused = peer.summary()["faults_injected"]["failure"]
    peer.configure({"failure_rate": 0.0})
    back = time.monotonic()
    driver.join(240)
    assert not driver.is_alive(), "the driver did not finish"
    table = "grants" if role == "bonus" else "sends"
    poll(lambda: count(db, f"SELECT count(*) FROM {table} WHERE status = 'claimed'") == 0, 30,
         message="every ledger row settled")
    recovered = time.monotonic() - back
    record_figures(record_property, summary.get("lost", -1), summary.get("duplicate_effects", -1), recovered)

    expected = int(RATE * DURATION)
    assert summary["accepted"] == expected and summary["errors"] == {}, summary
    assert summary["lost"] == 0 and summary["duplicate_effects"] == 0 and summary["ok"], summary
    assert refused > expected, "the peer was not really down during the burst"
    done = "granted" if role == "bonus" else "sent"
    assert count(db, f"SELECT count(*) FROM {table} WHERE status <> %s", done) == 0
    assert count(db, f"SELECT count(*) FROM {table}") == summary["expected_effects"]
    assert count(db, "SELECT count(*) FROM notifications WHERE status = 'done'") == expected
    assert count(db, "SELECT count(*) FROM notifications") == expected
    ledger = peer.summary()
    assert ledger["applied"] == summary["expected_effects"]
    print(f"\n{role}: peer down {OUTAGE_S:.0f} s ({refused} calls refused) during {expected} triggers; every "
          f"effect made {recovered:.1f}s after it came back; applied {ledger['applied']}, lost 0, duplicates 0")
