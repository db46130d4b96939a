"""The relay's clock skewed by minutes: conditional deadlines and timed sends still come out right.

The worker and beat run under libfaketime (Debian's `faketime`, which `.ci/run` installs) with their
wall clock 3 minutes fast or slow; Postgres, Redis, the web process and the simulator keep the true
time. The relay decides "due" and "deadline near" by Postgres' clock, so neither skew may make a
send early, an approval late, or a customer unreported.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from simulator.conditional_driver import run_conditional
from simulator.send_driver import run_send_campaign
from tests.conftest import ADMIN_PASSWORD, TOKEN, count
from tests.e2e.test_scheduled_send import ATTRIBUTES, SEND_CHANNEL, channel_config
from tests.faults.support import record_figures
from tests.harness import relay_env

pytestmark = pytest.mark.faults

LIBFAKETIME = Path("/usr/lib/x86_64-linux-gnu/faketime/libfaketimeMT.so.1")


def skewed(env: dict[str, str], seconds: int) -> dict[str, str]:
    """`env` with the process's clocks moved by `seconds`."""
    if not LIBFAKETIME.exists():
        pytest.skip("libfaketime is not installed (apt-get install faketime; .ci/run does)")
    # a plain offset: every clock (monotonic too, so absolute sleeps stay consistent) moves by `seconds`
    return {**env, "LD_PRELOAD": str(LIBFAKETIME), "FAKETIME": f"{seconds:+d}s", "FAKETIME_NO_CACHE": "1"}


@pytest.mark.parametrize("skew", [180, -180], ids=["3min_fast", "3min_slow"])
def test_skewed_workers_keep_deadlines_and_send_times(skew, procs, simulator, database_url, redis_url, db, tmp_path,
                                                      record_property):
    env = relay_env(database_url, redis_url, OPTIMOVE_API_URL=simulator.optimove_url,
                    OPTIMOVE_API_KEY="sim-api-key-0123456789", OPTIMOVE_RATE_LIMIT="50/10s",
                    BONUS_URL=simulator.bonus_url, BONUS_REVOKE_URL=simulator.bonus_revoke_url,
                    BONUS_BATCH_SIZE=2000, RELAY_RELEASE_INTERVAL=1, OPTIMOVE_PAGE_SIZE=300,
                    RELAY_CHANNEL_CONFIG=channel_config(tmp_path), SEND_URL=simulator.send_url, SEND_MODE="batch",
                    SEND_BATCH_SIZE=100)
    base = procs.web(env)  # the listener keeps the true time
    procs.worker(skewed(env, skew), concurrency=2)
    procs.start("beat", ["beat", "--schedule-file", str(tmp_path / "beat-schedule")], skewed(env, skew))
    listener = f"{base}/optimove/events?token={TOKEN}"
    campaign_id = 707070 if skew > 0 else 717171

    conditional = run_conditional(listener, simulator.optimove_url, simulator.bonus_admin_url, customers=3_000,
                                  deadline_in=40, reject_every=25, campaign_id=campaign_id, timeout=10)
    assert conditional["ok"], json.dumps({k: v for k, v in conditional.items() if not isinstance(v, list)})
    assert conditional["approved_before_deadline"] == conditional["expected_approved"] > 0
    assert conditional["approved_after_deadline"] == 0 and conditional["grants_after_deadline"] == 0
    assert conditional["unreported"] == 0 and conditional["duplicate_grants"] == 0

    sends = run_send_campaign(
        listener, simulator.optimove_url, simulator.send_admin_url, f"{base}/api/campaigns/{{campaign_id}}",
        ("admin", ADMIN_PASSWORD), channels=(SEND_CHANNEL,), customers_per_channel=300, templates=(14, 15, 16),
        attributes=ATTRIBUTES, spread=20, due_now_fraction=0.5, start=time.time(), attribute_form="mixed",
        campaign_id=campaign_id + 1, timeout=60)
    record_figures(record_property, conditional["unreported"] + sends["expected_sends"] - sends["sent"],
                   conditional["duplicate_grants"] + sends["duplicates"])
    assert sends["ok"], sends
    assert sends["sent"] == sends["expected_sends"] == 300
    assert sends["early"] == 0 and sends["duplicates"] == 0
    # within the release interval plus a delivery once the sends due at once are out (README, flow 1)
    assert sends["late_seconds_caught_up"]["count"] >= 30 and sends["late_seconds_caught_up"]["max"] <= 5.0, sends
    assert sends["late_seconds_future"]["max"] <= 20.0, sends["late_seconds_future"]
    assert count(db, "SELECT count(*) FROM sends WHERE campaign_id = %s AND updated_at < scheduled_time",
                 campaign_id + 1) == 0
    print(f"\nworkers {skew:+d} s: conditional approved {conditional['approved_before_deadline']} before the deadline, "
          f"0 after; sends {sends['sent']}, early 0, latest {sends['late_seconds_future']['max']:.1f}s after due")
