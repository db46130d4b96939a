"""``python -m simulator serve``: ready file, both servers reachable, clean stop on SIGTERM."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import requests

ROOT = Path(__file__).resolve().parents[2]


def wait_for(path: Path, deadline: float) -> dict:
    while time.monotonic() < deadline:
        if path.exists():
            return json.loads(path.read_text())
        time.sleep(0.02)
    raise AssertionError(f"{path} not written in time")


def test_serve_writes_ready_file_and_stops_on_sigterm(tmp_path):
    ready = tmp_path / "ready.json"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    process = subprocess.Popen(
        [sys.executable, "-m", "simulator", "serve", "--optimove-port", "0", "--bonus-port", "0",
         "--api-key", "K", "--reject-code", "BAD", "--reject-template-id", "7", "--ready-file", str(ready)],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        urls = wait_for(ready, time.monotonic() + 10)
        assert urls["pid"] == process.pid
        assert urls["bonus_url"] == urls["bonus_admin_url"] + "/bonus/grants"
        assert urls["bonus_single_url"] == urls["bonus_admin_url"] + "/bonus/grant"
        assert urls["bonus_revoke_url"] == urls["bonus_admin_url"] + "/bonus/revokes"
        assert urls["bonus_revoke_single_url"] == urls["bonus_admin_url"] + "/bonus/revoke"
        listeners = requests.get(f"{urls['optimove_url']}/general/GetRegisteredEventListeners",
                                 headers={"X-API-KEY": "K"}, timeout=5)
        assert listeners.status_code == 200
        rejected = requests.post(urls["bonus_single_url"], json={"idempotency_key": "k", "campaign_id": 1,
                                                                  "customer_id": "C1", "promo_code": "BAD"}, timeout=5)
        assert rejected.status_code == 422
        assert urls["send_url"] == urls["send_admin_url"] + "/send/sends"
        assert urls["send_single_url"] == urls["send_admin_url"] + "/send/send"
        assert len({urls["optimove_url"], urls["bonus_admin_url"], urls["send_admin_url"]}) == 3
        sent = requests.post(urls["send_single_url"], json={
            "idempotency_key": "s", "campaign_id": 1, "channel_id": 610, "template_id": 7, "customer_id": "C1",
            "attributes": {}, "promo_codes": [], "scheduled_time": None, "notification_id": 3}, timeout=5)
        assert sent.status_code == 422  # --reject-template-id 7
        assert requests.get(urls["send_admin_url"] + "/_sim/ledger", timeout=5).json()["rejected"] == 1
    finally:
        process.send_signal(signal.SIGTERM)
        out, err = process.communicate(timeout=10)
    assert process.returncode == 0, err
    assert "fake Optimove listening on http://127.0.0.1:" in out
    assert "fake bonus system listening on http://127.0.0.1:" in out
    assert "fake send service listening on http://127.0.0.1:" in out


def test_start_serves_all_three_in_threads():
    from simulator.server import start

    running = start(api_key="K", send_faults={"reject_template_ids": [9]})
    try:
        assert set(running.urls()) == {"optimove_url", "bonus_url", "bonus_single_url", "bonus_revoke_url",
                                       "bonus_revoke_single_url", "bonus_admin_url", "send_url",
                                       "send_single_url", "send_admin_url", "pid"}
        assert running.send.config.reject_template_ids == (9,)
        state = requests.get(running.send_admin_url + "/_sim/ledger", params={"full": 1}, timeout=5).json()
        assert state["entries"] == [] and state["duplicate_sends"] == 0
    finally:
        running.stop()
