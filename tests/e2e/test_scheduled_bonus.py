"""Flow 3 end to end: real web and worker processes, real Postgres and Redis, the simulator as peers.

Each mode runs once per broker (`broker` fixture): Redis, and RabbitMQ (a fresh vhost; Redis keeps the
rate limiter).
"""
from __future__ import annotations

import pytest
import requests

from simulator.campaigns import channel_rows, validate_spec
from simulator.driver import run_campaign
from tests.conftest import ADMIN_PASSWORD, TOKEN, count
from tests.harness import relay_env

from shared.optimove.rows import parse_execution_row

pytestmark = pytest.mark.e2e


def expected_set(spec: dict) -> set[tuple[int, str, str]]:
    """Every (campaign, customer, promo) triple of a spec, by brute force over the generated rows."""
    out = set()
    for channel in spec["channels"]:
        for row in channel_rows(spec, channel, 0, 10 ** 9):
            parsed = parse_execution_row(row)
            out.update((spec["campaign_id"], parsed.customer_id, code) for code in parsed.promo_codes)
    return out


@pytest.mark.parametrize("mode", ["batch", "single"])
def test_three_channel_campaign_granted_exactly_once(mode, broker, procs, simulator, database_url, redis_url, db):
    bonus_url = simulator.bonus_url if mode == "batch" else simulator.bonus_single_url
    env = relay_env(database_url, redis_url, BROKER_URL=broker, OPTIMOVE_API_URL=simulator.optimove_url,
                    OPTIMOVE_API_KEY="sim-api-key-0123456789", OPTIMOVE_PAGE_SIZE=400,
                    BONUS_URL=bonus_url, BONUS_MODE=mode, BONUS_BATCH_SIZE=200)
    base = procs.web(env)
    procs.worker(env, concurrency=2)
    campaign_id = 424242 if mode == "batch" else 434343
    summary = run_campaign(f"{base}/optimove/events?token={TOKEN}", simulator.optimove_url,
                           simulator.bonus_admin_url, f"{base}/api/campaigns/{{campaign_id}}",
                           ("admin", ADMIN_PASSWORD), channels=(504, 505, 506), customers_per_channel=1500,
                           overlap=0.5, multi_code_every=2, campaign_id=campaign_id, timeout=120)
    spec = validate_spec({"campaign_id": campaign_id, "channels": [504, 505, 506], "customers_per_channel": 1500,
                          "overlap": 0.5, "codes": ["WB23", "NV10"], "multi_code_every": 2})
    expected = expected_set(spec)
    assert summary["ok"], summary
    assert summary["expected_triples"] == len(expected)
    assert summary["duplicate_grants"] == 0
    ledger = requests.get(simulator.bonus_admin_url + "/_sim/ledger?full=1", timeout=10).json()
    applied = {(int(c), str(cu), str(p)) for c, cu, p in ledger["triples"] if int(c) == campaign_id}
    assert applied == expected
    assert count(db, "SELECT count(*) FROM grants WHERE campaign_id = %s AND status = 'granted'",
                 campaign_id) == len(expected)
    assert count(db, "SELECT count(*) FROM notifications WHERE campaign_id = %s", campaign_id) == 3
    status = summary["relay_totals"]
    assert status["claimed"] == len(expected)
    pairs = sum(len(parse_execution_row(r).promo_codes)
                for ch in spec["channels"] for r in channel_rows(spec, ch, 0, 10 ** 9))
    assert status["claimed"] + status["duplicates_skipped"] == pairs
    # /readyz checks RabbitMQ on its own; /metrics reads its queue depth (ready messages) over AMQP
    checks = requests.get(base + "/readyz", timeout=10).json()["checks"]
    assert checks == {"postgres": "ok", "redis": "ok", **({"rabbitmq": "ok"} if broker.kind == "amqp" else {})}
    scrape = requests.get(base + "/metrics", timeout=10).text
    assert 'relay_metrics_source_up{source="broker"} 1.0' in scrape, scrape[-2000:]
    assert 'relay_queue_messages{queue="grants"}' in scrape
    logs = procs.logs(tail=None)
    assert "process_notification" in logs and "granted" in logs  # the logs are there to be searched
    for secret in (TOKEN, ADMIN_PASSWORD, "sim-api-key-0123456789"):
        assert secret not in logs, f"a secret reached the logs: {secret[:4]}…"
