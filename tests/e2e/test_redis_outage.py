"""Redis stopped (a private instance): the listener still acknowledges, and the sweeper catches up."""
from __future__ import annotations

import time

import pytest

from cli.embedded import EmbeddedRedis
from tests.conftest import count, poll
from tests.faults.support import record_figures
from tests.harness import post_notification, relay_env

pytestmark = pytest.mark.e2e


def test_listener_accepts_while_redis_down_and_sweeper_enqueues_later(procs, tmp_path, database_url, db,
                                                                     record_property):
    redis = EmbeddedRedis(tmp_path / "redis", appendonly=False)
    redis.start()
    try:
        env = relay_env(database_url, redis.url, RELAY_SWEEP_AFTER=15, RELAY_SWEEP_INTERVAL=1)
        base = procs.web(env)
        redis.stop()

        response = post_notification(base, {"EventTypeID": 2, "TimeStamp": "2026-11-27 23:00:00"})
        assert response.status_code == 202, response.text
        nid = response.json()["notification_id"]
        assert count(db, "SELECT count(*) FROM notifications WHERE id = %s AND status = 'received'", nid) == 1

        redis.start()
        back = time.monotonic()
        procs.worker(env)
        procs.start("beat", ["beat", "--schedule-file", str(tmp_path / "beat-schedule")], env)
        poll(lambda: count(db, "SELECT count(*) FROM notifications WHERE id = %s AND status = 'ignored'", nid),
             60, 0.2, "the swept notification to be processed")
        recovered = time.monotonic() - back
        record_figures(record_property, lost=count(db, "SELECT count(*) FROM notifications WHERE status = 'received'"),
                       duplicates=count(db, "SELECT attempts FROM notifications WHERE id = %s",
                                                                 nid) - 1, recovery_s=recovered)
        assert count(db, "SELECT attempts FROM notifications WHERE id = %s", nid) == 1

        # the web process publishes again once Redis is back (no producer stuck on the dead connection)
        later = post_notification(base, {"EventTypeID": 3, "TimeStamp": "2026-11-27 23:30:00"})
        assert later.status_code == 202
        nid2 = later.json()["notification_id"]
        poll(lambda: count(db, "SELECT count(*) FROM notifications WHERE id = %s AND status = 'ignored'", nid2),
             8, 0.05, "the next notification to be processed without the sweeper (age limit 15 s)")
        print(f"\nnotification acknowledged while Redis was down; processed once {recovered:.1f}s after Redis came "
              f"back (sweeper age 15 s); the next one went straight through")
    finally:
        procs.stop_all()
        redis.stop()
