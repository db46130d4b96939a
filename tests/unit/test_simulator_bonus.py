"""Fake bonus system over real HTTP: idempotency, rejections, faults, ledger counters."""

import functools
import threading
import time

import pytest
import requests

from simulator.bonus import create_bonus_app
from simulator.send import create_send_app


@pytest.fixture
def peers():
    """Start fake peers ("bonus" or "send") on free ports; yields start(kind, **settings) -> (app, base_url)."""
    servers = []

    def start(kind, **settings):
        app = {"bonus": create_bonus_app, "send": create_send_app}[kind](seed=1, **settings)
        server = app.make_server("127.0.0.1", 0)
        threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True).start()
        servers.append(server)
        return app, f"http://127.0.0.1:{server.server_address[1]}"

    yield start
    for server in servers:
        server.shutdown()
        server.server_close()


@pytest.fixture
def bonus(peers):
    """Start a bonus system on a free port; yields start(**settings) -> (app, base_url)."""
    return functools.partial(peers, "bonus")


def grant(key, customer="C00000001", code="WB23", campaign=123, notification_id=None):
    return {"idempotency_key": key, "campaign_id": campaign, "channel_id": 504, "customer_id": customer,
            "promo_code": code, "source": "scheduled" if notification_id is None else "realtime",
            "notification_id": notification_id}


def ledger(url, full=False):
    return requests.get(f"{url}/_sim/ledger", params={"full": 1} if full else None, timeout=5).json()


def test_batch_is_idempotent_per_key(bonus):
    _, url = bonus()
    batch = {"grants": [grant("k1"), grant("k2", customer="C2"), grant("k1")]}
    first = requests.post(f"{url}/bonus/grants", json=batch, timeout=5).json()["results"]
    assert [r["status"] for r in first] == ["granted"] * 3
    assert first[0]["reference"] == first[2]["reference"] != first[1]["reference"]
    again = requests.post(f"{url}/bonus/grants", json=batch, timeout=5).json()["results"]
    assert again == first
    state = ledger(url, full=True)
    assert state["applied"] == 2 and state["unique_triples"] == 2 and state["duplicate_grants"] == 0
    assert state["calls"] == 2 and state["items_received"] == 6
    assert sorted(state["triples"]) == [[123, "C00000001", "WB23"], [123, "C2", "WB23"]]


def test_single_grant_201_then_409(bonus):
    _, url = bonus()
    body = grant("k1")
    first = requests.post(f"{url}/bonus/grant", json=body, headers={"Idempotency-Key": "k1"}, timeout=5)
    assert first.status_code == 201 and first.json()["reference"]
    repeat = requests.post(f"{url}/bonus/grant", json={**body, "idempotency_key": None},
                           headers={"Idempotency-Key": "k1"}, timeout=5)
    assert repeat.status_code == 409 and repeat.json()["reference"] == first.json()["reference"]
    mismatch = requests.post(f"{url}/bonus/grant", json=body, headers={"Idempotency-Key": "other"}, timeout=5)
    assert mismatch.status_code == 400
    assert ledger(url)["applied"] == 1


def test_rejected_codes_are_recorded_not_applied(bonus):
    _, url = bonus(reject_codes=["BAD"])
    results = requests.post(f"{url}/bonus/grants", json={"grants": [grant("k1", code="BAD"), grant("k2")]},
                            timeout=5).json()["results"]
    assert results[0]["status"] == "rejected" and "BAD" in results[0]["reason"]
    single = requests.post(f"{url}/bonus/grant", json=grant("k3", code="BAD"), timeout=5)
    assert single.status_code == 422 and single.json()["reason"]
    state = ledger(url)
    assert state["applied"] == 1 and state["rejected"] == 2


def test_same_triple_under_new_key_counts_as_duplicate(bonus):
    _, url = bonus()
    requests.post(f"{url}/bonus/grants", json={"grants": [grant("k1"), grant("k2")]}, timeout=5)
    requests.post(f"{url}/bonus/grant", json=grant("k3"), timeout=5)
    state = ledger(url)
    assert state["applied"] == 3 and state["unique_triples"] == 1 and state["duplicate_grants"] == 2


def test_drop_after_apply_gives_connection_error_and_applies(bonus):
    _, url = bonus(drop_after_apply_rate=1.0)
    with pytest.raises(requests.ConnectionError):
        requests.post(f"{url}/bonus/grants", json={"grants": [grant("k1")]}, timeout=5)
    with pytest.raises(requests.ConnectionError):
        requests.post(f"{url}/bonus/grant", json=grant("k2", customer="C2"), timeout=5)
    state = ledger(url)
    assert state["applied"] == 2 and state["faults_injected"]["drop"] == 2
    requests.post(f"{url}/_sim/config", json={"drop_after_apply_rate": 0}, timeout=5)
    retry = requests.post(f"{url}/bonus/grant", json=grant("k2", customer="C2"), timeout=5)
    assert retry.status_code == 409
    assert ledger(url)["applied"] == 2


def test_drop_on_a_kept_alive_session_connection(bonus):
    _, url = bonus()
    session = requests.Session()
    assert session.post(f"{url}/bonus/grant", json=grant("k1"), timeout=5).status_code == 201
    session.post(f"{url}/_sim/config", json={"drop_after_apply_rate": 1.0}, timeout=5)
    with pytest.raises(requests.ConnectionError):
        session.post(f"{url}/bonus/grants", json={"grants": [grant("k2", customer="C2")]}, timeout=5)
    assert ledger(url)["applied"] == 2


def test_failure_and_timeout_faults_answer_503_without_applying(bonus):
    _, url = bonus(failure_rate=1.0)
    assert requests.post(f"{url}/bonus/grants", json={"grants": [grant("k1")]}, timeout=5).status_code == 503
    requests.post(f"{url}/_sim/config", json={"failure_rate": 0, "timeout_rate": 1, "timeout_sleep_s": 0.5},
                  timeout=5)
    with pytest.raises(requests.Timeout):
        requests.post(f"{url}/bonus/grant", json=grant("k2"), timeout=0.2)
    state = ledger(url)
    assert state["applied"] == 0 and state["faults_injected"]["failure"] == 1
    assert state["faults_injected"]["timeout"] == 1


def test_item_retry_and_config_validation(bonus):
    _, url = bonus(item_retry_rate=1.0)
    results = requests.post(f"{url}/bonus/grants", json={"grants": [grant("k1")]}, timeout=5).json()["results"]
    assert results[0]["status"] == "retry"
    assert requests.post(f"{url}/_sim/config", json={"failure_rate": 1.5}, timeout=5).status_code == 400
    assert requests.post(f"{url}/_sim/config", json={"nope": 1}, timeout=5).status_code == 400
    assert requests.post(f"{url}/_sim/config", json={"latency_ms": "x"}, timeout=5).status_code == 400


def test_malformed_batch_and_reset(bonus):
    _, url = bonus()
    assert requests.post(f"{url}/bonus/grants", json={"grants": [{"campaign_id": 1}]}, timeout=5).status_code == 400
    assert requests.post(f"{url}/bonus/grants", data=b"not json", timeout=5).status_code == 400
    requests.post(f"{url}/bonus/grants", json={"grants": [grant("k1")]}, timeout=5)
    requests.post(f"{url}/_sim/reset", timeout=5)
    assert ledger(url)["applied"] == 0


def test_batch_of_500_is_fast(bonus):
    _, url = bonus()
    session = requests.Session()
    batch = {"grants": [grant(f"k{i}", customer=f"C{i:08d}") for i in range(500)]}
    session.post(f"{url}/bonus/grants", json={"grants": [grant("warm")]}, timeout=5)
    started = time.perf_counter()
    response = session.post(f"{url}/bonus/grants", json=batch, timeout=5)
    elapsed = time.perf_counter() - started
    assert response.status_code == 200 and len(response.json()["results"]) == 500
    assert elapsed < 0.5


def test_retrigger_under_another_notification_is_not_a_duplicate(bonus):
    _, url = bonus()
    requests.post(f"{url}/bonus/grants", json={"grants": [grant("n1", notification_id=1),
                                                          grant("n2", notification_id=2)]}, timeout=5)
    state = ledger(url, full=True)
    assert state["applied"] == 2 and state["unique_triples"] == 2 and state["duplicate_grants"] == 0
    assert state["triples"] == [[123, "C00000001", "WB23"]] * 2
    requests.post(f"{url}/bonus/grant", json=grant("n1-again", notification_id=1), timeout=5)
    assert ledger(url)["duplicate_grants"] == 1


def test_ledger_records_first_receive_time_before_latency(bonus):
    _, url = bonus(latency_ms=300)
    before = time.time()
    requests.post(f"{url}/bonus/grants", json={"grants": [{**grant("k1", notification_id=7), "extra": "ignored"}]},
                  timeout=5)
    requests.post(f"{url}/bonus/grant", json=grant("k2", notification_id=7), timeout=5)
    [entry] = ledger(url, full=True)["entries"]
    assert entry["key"] == [123, "C00000001", "WB23", 7] and entry["idempotency_key"] == "k1"
    assert before <= entry["first_received_at"] < before + 0.25
    assert entry["applications"] == 2 and entry["source"] == "realtime"


def test_receive_time_is_recorded_for_a_failed_call(bonus):
    _, url = bonus(failure_rate=1.0)
    before = time.time()
    assert requests.post(f"{url}/bonus/grant", json=grant("k1"), timeout=5).status_code == 503
    [entry] = ledger(url, full=True)["entries"]
    assert entry["applications"] == 0 and entry["first_received_at"] >= before and entry["applied_at"] is None
    assert ledger(url, full=True)["triples"] == []
    requests.post(f"{url}/_sim/config", json={"failure_rate": 0}, timeout=5)
    assert requests.post(f"{url}/bonus/grant", json=grant("k1"), timeout=5).status_code == 201
    [entry] = ledger(url, full=True)["entries"]
    assert entry["applications"] == 1 and entry["applied_at"] > entry["first_received_at"]


def test_ledger_entries_filtered_by_campaign_and_customer_prefix(bonus):
    _, url = bonus()
    grants = [grant("a", customer="rt-x-1"), grant("b", customer="rt-y-1"), grant("c", customer="rt-x-2", campaign=9)]
    requests.post(f"{url}/bonus/grants", json={"grants": grants}, timeout=5)
    state = requests.get(f"{url}/_sim/ledger", params={"full": 1, "campaign_id": 123, "customer_prefix": "rt-x-"},
                         timeout=5).json()
    assert [e["idempotency_key"] for e in state["entries"]] == ["a"] and state["applied"] == 3
    assert requests.get(f"{url}/_sim/ledger", params={"campaign_id": "x"}, timeout=5).status_code == 400


def test_notification_id_must_be_an_integer_or_null(bonus):
    _, url = bonus()
    response = requests.post(f"{url}/bonus/grants", json={"grants": [grant("k1", notification_id="x")]}, timeout=5)
    assert response.status_code == 400 and "notification_id" in response.json()["error"]
    ok = requests.post(f"{url}/bonus/grants", json={"grants": [grant("k2", notification_id="12")]}, timeout=5)
    assert ok.status_code == 200
    assert ledger(url, full=True)["entries"][0]["key"][3] == 12
