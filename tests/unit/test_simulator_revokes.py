"""Fake bonus system revokes over real HTTP: idempotency, rejections, double revokes, faults, ledger."""

import threading

import pytest
import requests

from simulator.bonus import create_bonus_app
from simulator.send import create_send_app


@pytest.fixture
def bonus():
    """Start a bonus system on a free port; yields start(**settings) -> base_url."""
    servers = []

    def start(**settings):
        server = create_bonus_app(seed=1, **settings).make_server("127.0.0.1", 0)
        threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True).start()
        servers.append(server)
        return f"http://127.0.0.1:{server.server_address[1]}"

    yield start
    for server in servers:
        server.shutdown()
        server.server_close()


def grant(key, customer="C1", code="WB23", campaign=7):
    return {"idempotency_key": key, "campaign_id": campaign, "channel_id": None, "customer_id": customer,
            "promo_code": code, "source": "conditional"}


def revoke(key, customer="C1", code="WB23", campaign=7, reference=None):
    return {"idempotency_key": key, "campaign_id": campaign, "customer_id": customer, "promo_code": code,
            "reference": reference}


def granted(url, *grants):
    results = requests.post(f"{url}/bonus/grants", json={"grants": list(grants)}, timeout=5).json()["results"]
    return {r["idempotency_key"]: r.get("reference") for r in results}


def revoked(url, *revokes):
    response = requests.post(f"{url}/bonus/revokes", json={"revokes": list(revokes)}, timeout=5)
    assert response.status_code == 200, response.text
    return response.json()["results"]


def ledger(url, **params):
    return requests.get(f"{url}/_sim/ledger", params=params, timeout=5).json()


def test_revoke_applied_grant_once_per_key(bonus):
    url = bonus()
    references = granted(url, grant("g1"), grant("g2", customer="C2"))
    [first] = revoked(url, revoke("r1", reference=references["g1"]))
    assert first["status"] == "revoked" and first["idempotency_key"] == "r1" and first["reference"].startswith("REV-")
    [again] = revoked(url, revoke("r1", reference=references["g1"]))
    assert again == first
    state = ledger(url, full=1)
    assert state["revoked"] == 1 and state["double_revokes"] == 0 and state["revokes_rejected"] == 0
    assert state["revoke_calls"] == 2 and state["revokes_received"] == 2
    assert state["calls"] == 1 and state["applied"] == 2  # revokes are not grant calls
    by_customer = {entry["key"][1]: entry for entry in state["entries"]}
    assert by_customer["C1"]["revoked"] is True and by_customer["C1"]["revocations"] == 1
    assert by_customer["C1"]["revoked_at"] >= by_customer["C1"]["applied_at"]
    assert by_customer["C1"]["reference"] == references["g1"]
    assert by_customer["C2"]["revoked"] is False and by_customer["C2"]["revoked_at"] is None
    assert state["revoked_triples"] == [[7, "C1", "WB23"]] and len(state["triples"]) == 2


def test_revoke_of_a_grant_never_applied_is_rejected_with_reason(bonus):
    url = bonus(reject_codes=["BAD"])
    granted(url, grant("g1", code="BAD"))
    results = revoked(url, revoke("r1", code="BAD"), revoke("r2", customer="nobody"),
                      revoke("r3", campaign=8))
    assert [r["status"] for r in results] == ["rejected"] * 3
    assert all("no granted item" in r["reason"] for r in results)
    assert ledger(url)["revokes_rejected"] == 3 and ledger(url)["revoked"] == 0


def test_revoke_with_a_wrong_reference_is_rejected(bonus):
    url = bonus()
    references = granted(url, grant("g1"))
    [wrong] = revoked(url, revoke("r1", reference="BON-999999999"))
    assert wrong["status"] == "rejected" and references["g1"] in wrong["reason"]
    [right] = revoked(url, revoke("r2", reference=references["g1"]))
    assert right["status"] == "revoked"


def test_revoking_again_under_a_new_key_counts_as_double_revoke(bonus):
    url = bonus()
    granted(url, grant("g1"))
    revoked(url, revoke("r1"))
    [second] = revoked(url, revoke("r2"))
    assert second["status"] == "revoked" and second["reason"] == "already revoked"
    state = ledger(url, full=1)
    assert state["revoked"] == 1 and state["double_revokes"] == 1
    assert state["entries"][0]["revocations"] == 2


def test_single_revoke_201_409_422(bonus):
    url = bonus()
    granted(url, grant("g1"))
    body = revoke("r1")
    first = requests.post(f"{url}/bonus/revoke", json=body, headers={"Idempotency-Key": "r1"}, timeout=5)
    assert first.status_code == 201 and first.json()["reference"].startswith("REV-")
    repeat = requests.post(f"{url}/bonus/revoke", json={**body, "idempotency_key": None},
                           headers={"Idempotency-Key": "r1"}, timeout=5)
    assert repeat.status_code == 409 and repeat.json() == first.json()
    missing = requests.post(f"{url}/bonus/revoke", json=revoke("r2", customer="C9"), timeout=5)
    assert missing.status_code == 422 and missing.json()["reason"]
    assert requests.post(f"{url}/bonus/revoke", json={"campaign_id": 7}, timeout=5).status_code == 400
    assert ledger(url)["revoked"] == 1


def test_revoke_faults_like_grants(bonus):
    url = bonus()
    granted(url, grant("g1"), grant("g2", customer="C2"), grant("g3", customer="C3"))
    requests.post(f"{url}/_sim/config", json={"failure_rate": 1.0}, timeout=5)
    failed = requests.post(f"{url}/bonus/revokes", json={"revokes": [revoke("r1")]}, timeout=5)
    assert failed.status_code == 503 and ledger(url)["revoked"] == 0
    requests.post(f"{url}/_sim/config", json={"failure_rate": 0, "item_retry_rate": 1.0}, timeout=5)
    assert revoked(url, revoke("r1"))[0]["status"] == "retry"
    requests.post(f"{url}/_sim/config", json={"item_retry_rate": 0, "drop_after_apply_rate": 1.0}, timeout=5)
    with pytest.raises(requests.ConnectionError):
        requests.post(f"{url}/bonus/revokes", json={"revokes": [revoke("r1")]}, timeout=5)
    with pytest.raises(requests.ConnectionError):
        requests.post(f"{url}/bonus/revoke", json=revoke("r2", customer="C2"), timeout=5)
    state = ledger(url)
    assert state["revoked"] == 2 and state["faults_injected"] == {"failure": 1, "timeout": 0, "drop": 2,
                                                                   "item_retry": 1}
    requests.post(f"{url}/_sim/config", json={"drop_after_apply_rate": 0}, timeout=5)
    assert revoked(url, revoke("r1"))[0]["status"] == "revoked"  # the retry after a drop: same answer
    assert ledger(url)["revoked"] == 2 and ledger(url)["double_revokes"] == 0


def test_malformed_revokes(bonus):
    url = bonus()
    for body in ({"revokes": [{"idempotency_key": "r", "campaign_id": 7, "customer_id": "C1"}]},
                 {"revokes": [{**revoke("r"), "reference": 5}]}, {"revokes": "x"}, {"grants": []}):
        assert requests.post(f"{url}/bonus/revokes", json=body, timeout=5).status_code == 400
    too_many = {"revokes": [revoke(f"r{i}") for i in range(10_001)]}
    assert requests.post(f"{url}/bonus/revokes", json=too_many, timeout=5).status_code == 400


def test_reset_forgets_revokes(bonus):
    url = bonus()
    granted(url, grant("g1"))
    revoked(url, revoke("r1"))
    requests.post(f"{url}/_sim/reset", timeout=5)
    state = ledger(url)
    assert state["revoked"] == 0 and state["revoke_calls"] == 0
    granted(url, grant("g1"))
    assert revoked(url, revoke("r1"))[0]["status"] == "revoked"


def test_send_service_takes_no_revokes():
    app = create_send_app()
    server = app.make_server("127.0.0.1", 0)
    threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}"
        assert requests.post(f"{url}/send/revokes", json={"revokes": []}, timeout=5).status_code == 404
        state = ledger(url, full=1)
        assert "revoked" not in state and "double_revokes" not in state
    finally:
        server.shutdown()
        server.server_close()
