"""A real `relay worker` (prefork, two pool children) serves its own metrics port: what its children did in a
simulated campaign (Optimove calls, grants, bonus calls, the runs) adds up there, and matches Postgres."""
from __future__ import annotations

import re

import pytest
import requests

from cli.embedded import free_port
from simulator.driver import run_campaign
from tests.conftest import ADMIN_PASSWORD, TOKEN, count, poll
from tests.harness import relay_env

pytestmark = pytest.mark.e2e


def sample(text: str, name: str, **labels) -> float:
    """The value of one series in Prometheus text (0 when absent)."""
    want = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
    for line in text.splitlines():
        match = re.fullmatch(r"([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})? (\S+)", line)
        if match and match.group(1) == name and ",".join(sorted((match.group(2) or "").split(","))) == want:
            return float(match.group(3))
    return 0.0


def test_worker_port_reports_its_pool_children_after_a_campaign(procs, simulator, database_url, redis_url, db):
    env = relay_env(database_url, redis_url, OPTIMOVE_API_URL=simulator.optimove_url,
                    OPTIMOVE_API_KEY="sim-api-key-0123456789", OPTIMOVE_PAGE_SIZE=200,
                    BONUS_URL=simulator.bonus_url, BONUS_BATCH_SIZE=100)
    base = procs.web(env)
    port = free_port()
    procs.start("worker", ["worker", "--concurrency", "2", "--metrics-port", str(port)], env)
    url = f"http://127.0.0.1:{port}/metrics"
    poll(lambda: _get(url), 30, 0.1, message="the worker's metrics port")
    summary = run_campaign(f"{base}/optimove/events?token={TOKEN}", simulator.optimove_url,
                           simulator.bonus_admin_url, f"{base}/api/campaigns/{{campaign_id}}",
                           ("admin", ADMIN_PASSWORD), channels=(504, 505), customers_per_channel=500,
                           overlap=0.5, multi_code_every=2, campaign_id=515151, timeout=120)
    assert summary["ok"], summary
    granted = count(db, "SELECT count(*) FROM grants WHERE campaign_id = 515151 AND status = 'granted'")
    pages = count(db, "SELECT sum(pages_fetched) FROM campaign_runs WHERE campaign_id = 515151")

    def settled():
        text = _get(url)
        done = sample(text, "relay_run_duration_seconds_count", flow="scheduled_bonus", status="done") == 2
        return text if done and sample(text, "relay_grants_total", flow="scheduled_bonus",
                                       outcome="granted") == granted else None

    text = poll(settled, 30, 0.2, message="the worker's counters to reach the ledger's")
    function = "GetCustomerExecutionDetailsByCampaign"
    assert sample(text, "relay_optimove_calls_total", function=function, status="200") == pages
    assert sample(text, "relay_optimove_call_seconds_count", function=function) == pages
    assert sample(text, "relay_claims_total", ledger="grants", flow="scheduled_bonus") == granted
    assert sample(text, "relay_duplicates_skipped_total", flow="scheduled_bonus") == \
        count(db, "SELECT sum(duplicates_skipped) FROM campaign_runs WHERE campaign_id = 515151")
    assert sample(text, "relay_adapter_call_seconds_count", adapter="bonus", outcome="2xx") >= granted / 100
    assert sample(text, "relay_notifications_processed_total", event_type="13", status="done") == 2
    assert "relay_limiter_requests_total" in text
    # the web's /metrics has the queues and the backlog, not the workers' counters
    web = requests.get(f"{base}/metrics", timeout=10).text
    assert 'relay_queue_messages{queue="campaigns"}' in web and 'relay_metrics_source_up{source="postgres"} 1.0' in web


def _get(url: str) -> str | None:
    try:
        response = requests.get(url, timeout=2)
    except requests.RequestException:
        return None
    return response.text if response.status_code == 200 else None
