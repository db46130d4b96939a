"""RELAY_LOG_FORMAT=json: every line that real web, worker and beat processes write is one JSON event."""
from __future__ import annotations

import json

import pytest
import requests

from simulator.driver import run_campaign
from tests.conftest import ADMIN_PASSWORD, TOKEN
from tests.harness import relay_env

pytestmark = pytest.mark.e2e

API_KEY = "sim-api-key-0123456789"


def events(path) -> list[dict]:
    """Each line of a process log as JSON (fails naming the first line that is not one JSON object)."""
    out, bad = [], []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        try:
            event = json.loads(line)
        except ValueError:
            bad.append(f"{path.name}:{number}: {line[:300]!r}")
            continue
        assert isinstance(event, dict), line
        missing = {"ts", "level", "logger", "message"} - event.keys()
        assert not missing, f"{path.name}:{number} lacks {missing}: {line[:300]}"
        out.append(event)
    assert not bad, "lines that are not JSON:\n" + "\n".join(bad[:20])
    assert out, f"{path.name} is empty"
    return out


def test_every_log_line_is_json_with_the_ids(procs, simulator, database_url, redis_url, db, tmp_path):
    env = relay_env(database_url, redis_url, RELAY_LOG_FORMAT="json", OPTIMOVE_API_URL=simulator.optimove_url,
                    OPTIMOVE_API_KEY=API_KEY, OPTIMOVE_PAGE_SIZE=20, BONUS_URL=simulator.bonus_url,
                    BONUS_AUTH_HEADER="Authorization: Bearer bonus-credential-0123456789")
    base = procs.web(env)
    procs.worker(env, concurrency=2)
    procs.start("beat", ["beat", "--schedule-file", str(tmp_path / "beat-schedule")], env)
    summary = run_campaign(f"{base}/optimove/events?token={TOKEN}", simulator.optimove_url,
                           simulator.bonus_admin_url, f"{base}/api/campaigns/{{campaign_id}}",
                           ("admin", ADMIN_PASSWORD), channels=(504, 505), customers_per_channel=50,
                           campaign_id=515151, timeout=60)
    assert summary["ok"], summary
    # a refused request and one that fails validation are logged too
    assert requests.post(f"{base}/optimove/events?token=wrong-token-0123456789", json={}, timeout=10).status_code \
        in (401, 403)
    assert requests.post(f"{base}/optimove/events?token={TOKEN}", data="not json", timeout=10).status_code >= 400
    procs.stop_all()  # flush and end every process: the logs are complete

    web, worker, beat = (events(tmp_path / f"{name}.log") for name in ("web", "worker", "beat"))
    assert any(e["logger"] == "gunicorn.error" for e in web), "gunicorn's own lines in the format"
    access = [e for e in web if e["logger"] == "gunicorn.access"]
    assert any(e.get("path") == "/optimove/events" and e.get("status") == 202 for e in access), access[:5]
    assert any(e["logger"].startswith("celery") for e in worker), "Celery's own lines in the format"
    assert any(e["logger"].startswith("celery") for e in beat)
    processed = [e for e in worker if "notification_id" in e and "campaign_id" in e and "task_id" in e]
    assert processed and all(e["campaign_id"] == 515151 for e in processed)
    assert any("run_id" in e and e.get("campaign_id") == 515151 for e in worker), "page lines carry the run"
    assert any(e.get("task") == "relay.process_notification" or "process_notification" in e["message"]
               for e in worker)
    text = "\n".join(p.read_text() for p in tmp_path.glob("*.log"))
    for secret in (TOKEN, ADMIN_PASSWORD, API_KEY, "bonus-credential-0123456789", "wrong-token-0123456789"):
        assert secret not in text, f"a secret reached the logs: {secret[:4]}…"
