"""Fake send service over real HTTP: idempotency, validation, faults, duplicates per ledger key."""

import functools
import time
from datetime import datetime, timedelta, timezone

import pytest
import requests

from tests.unit.test_simulator_bonus import peers  # noqa: F401  (the fixture)


@pytest.fixture
def send(peers):  # noqa: F811
    """Start a send service on a free port; yields start(**settings) -> (app, base_url)."""
    return functools.partial(peers, "send")


def item(key, customer="c-1", template=14, campaign=9001, channel=610, notification_id=5, **extra):
    return {"idempotency_key": key, "campaign_id": campaign, "channel_id": channel, "template_id": template,
            "customer_id": customer, "attributes": {"Email": f"{customer}@example.com"},
            "promo_codes": ["A1"], "scheduled_time": None, "source": "realtime",
            "notification_id": notification_id, **extra}


def post_batch(url, *items):
    return requests.post(f"{url}/send/sends", json={"sends": list(items)}, timeout=5)


def ledger(url, full=False):
    return requests.get(f"{url}/_sim/ledger", params={"full": 1} if full else None, timeout=5).json()


def test_batch_is_idempotent_per_key(send):
    _, url = send()
    first = post_batch(url, item("k1"), item("k2", customer="c-2"), item("k1")).json()["results"]
    assert [r["status"] for r in first] == ["sent"] * 3
    assert first[0]["reference"] == first[2]["reference"] != first[1]["reference"]
    assert first[0]["reference"].startswith("SND-")
    assert post_batch(url, item("k1"), item("k2", customer="c-2"), item("k1")).json()["results"] == first
    assert ledger(url) == {"applied": 2, "unique_keys": 2, "duplicate_sends": 0, "calls": 2,
                           "items_received": 6, "rejected": 0,
                           "faults_injected": {"failure": 0, "timeout": 0, "drop": 0, "item_retry": 0},
                           "timed_keys": 0, "early": 0,
                           "late_seconds": {"p50": None, "p99": None, "max": None, "count": 0}}


def test_single_send_201_409_422_and_400(send):
    _, url = send(reject_template_ids=[99])
    calls = [  # (body, Idempotency-Key header, expected status)
        (item("k1"), "k1", 201),
        ({**item("k1"), "idempotency_key": None}, "k1", 409),
        (item("k1"), "other", 400),
        (item("k2", template=99), None, 422),
    ]
    answers = [requests.post(f"{url}/send/send", json=body, headers={"Idempotency-Key": key} if key else {},
                             timeout=5) for body, key, _ in calls]
    assert [answer.status_code for answer in answers] == [status for *_, status in calls]
    assert answers[0].json()["reference"] == answers[1].json()["reference"]
    assert "match" in answers[2].json()["reason"] and "99" in answers[3].json()["reason"]
    state = ledger(url)
    assert state["applied"] == 1 and state["rejected"] == 1


def test_reject_template_ids_at_runtime_and_config_validation(send):
    _, url = send()
    assert requests.post(f"{url}/_sim/config", json={"reject_template_ids": [15]}, timeout=5).status_code == 200
    results = post_batch(url, item("k1", template=15), item("k2")).json()["results"]
    assert [r["status"] for r in results] == ["rejected", "sent"] and "15" in results[0]["reason"]
    for bad in ({"reject_template_ids": ["15"]}, {"reject_template_ids": 15}, {"reject_codes": ["A"]},
                {"failure_rate": 2}, {"latency_ms": -1}):
        assert requests.post(f"{url}/_sim/config", json=bad, timeout=5).status_code == 400, bad


@pytest.mark.parametrize("change, field", [
    ({"idempotency_key": None}, "idempotency_key"),
    ({"campaign_id": "x"}, "campaign_id"),
    ({"template_id": None}, "template_id"),
    ({"customer_id": ""}, "customer_id"),
    ({"customer_id": 7}, "customer_id"),
    ({"attributes": ["Email"]}, "attributes"),
    ({"promo_codes": "A1,B2"}, "promo_codes"),
    ({"promo_codes": ["A1", 2]}, "promo_codes"),
    ({"notification_id": "n"}, "notification_id"),
    ({"channel_id": [1]}, "channel_id"),
])
def test_invalid_items_are_refused_naming_the_field(send, change, field):
    _, url = send()
    batch = post_batch(url, {**item("k1"), **change})
    assert batch.status_code == 400 and field in batch.json()["error"]
    single = requests.post(f"{url}/send/send", json={**item("k1"), **change}, timeout=5)
    assert single.status_code == 400 and field in single.json()["reason"]
    assert ledger(url)["calls"] == 0


def test_malformed_bodies_and_unknown_fields(send):
    _, url = send()
    assert requests.post(f"{url}/send/sends", json={"grants": []}, timeout=5).status_code == 400
    assert requests.post(f"{url}/send/sends", data=b"{", timeout=5).status_code == 400
    assert post_batch(url, item("k1", extra={"a": 1}, campaign="9001")).status_code == 200
    assert ledger(url, full=True)["entries"][0]["key"] == [9001, 610, "c-1", 14, 5]


def test_duplicates_are_counted_per_ledger_key(send):
    _, url = send()
    post_batch(url, item("n5"), item("n6", notification_id=6), item("other-channel", channel=611),
               item("campaign-send", notification_id=None))
    state = ledger(url)
    assert state["applied"] == 4 and state["unique_keys"] == 4 and state["duplicate_sends"] == 0
    requests.post(f"{url}/send/send", json=item("n5-second-key"), timeout=5)
    state = ledger(url, full=True)
    assert state["applied"] == 5 and state["duplicate_sends"] == 1
    [entry] = [e for e in state["entries"] if e["key"] == [9001, 610, "c-1", 14, 5]]
    assert entry["applications"] == 2 and entry["idempotency_key"] == "n5"


def test_first_receive_time_is_taken_before_latency(send):
    _, url = send(latency_ms=300)
    before = time.time()
    post_batch(url, item("k1"))
    post_batch(url, item("k2"))
    [entry] = ledger(url, full=True)["entries"]
    assert before <= entry["first_received_at"] < before + 0.25
    assert entry["idempotency_key"] == "k1" and entry["applications"] == 2 and entry["source"] == "realtime"


def test_failure_timeout_drop_and_item_retry_faults(send):
    _, url = send(failure_rate=1.0)
    assert post_batch(url, item("k1")).status_code == 503
    requests.post(f"{url}/_sim/config", json={"failure_rate": 0, "timeout_rate": 1, "timeout_sleep_s": 0.5},
                  timeout=5)
    with pytest.raises(requests.Timeout):
        requests.post(f"{url}/send/send", json=item("k2"), timeout=0.2)
    requests.post(f"{url}/_sim/config", json={"timeout_rate": 0, "drop_after_apply_rate": 1}, timeout=5)
    with pytest.raises(requests.ConnectionError):
        post_batch(url, item("k3", customer="c-3"))
    requests.post(f"{url}/_sim/config", json={"drop_after_apply_rate": 0, "item_retry_rate": 1}, timeout=5)
    assert post_batch(url, item("k4", customer="c-4")).json()["results"][0]["status"] == "retry"
    state = ledger(url)
    assert state["applied"] == 1 and state["faults_injected"] == {"failure": 1, "timeout": 1, "drop": 1,
                                                                  "item_retry": 1}
    requests.post(f"{url}/_sim/config", json={"item_retry_rate": 0}, timeout=5)
    assert requests.post(f"{url}/send/send", json=item("k3", customer="c-3"), timeout=5).status_code == 409


def test_reset_forgets_sends_and_keeps_settings(send):
    _, url = send(reject_template_ids=[14])
    post_batch(url, item("k1"))
    assert requests.post(f"{url}/_sim/reset", timeout=5).json() == {"reset": True}
    state = ledger(url, full=True)
    assert state["rejected"] == 0 and state["calls"] == 0 and state["entries"] == []
    assert post_batch(url, item("k1")).json()["results"][0]["status"] == "rejected"


def iso(epoch, offset_hours=0):
    return datetime.fromtimestamp(epoch, timezone(timedelta(hours=offset_hours))).isoformat()


def test_early_and_late_sends_are_counted_against_scheduled_time(send):
    _, url = send()
    now = time.time()
    post_batch(url, item("late-3", customer="c-1", scheduled_time=iso(now - 3)),
               item("late-10", customer="c-2", scheduled_time=iso(now - 10, offset_hours=5.5)),
               item("early", customer="c-3", scheduled_time=iso(now + 100, offset_hours=-5)),
               item("realtime", customer="c-4"))
    requests.post(f"{url}/send/send", json=item("late-1", customer="c-5", scheduled_time=iso(now - 1)),
                  timeout=5)
    state = ledger(url, full=True)
    assert state["timed_keys"] == 4 and state["early"] == 1 and state["applied"] == 5
    late = state["late_seconds"]
    assert late["count"] == 4 and late["p50"] >= 1 and 10 <= late["max"] < 12 and late["p99"] == late["max"]
    entries = {entry["key"][2]: entry for entry in state["entries"]}
    assert entries["c-3"]["early"] == 1 and entries["c-1"]["early"] == 0
    assert abs(entries["c-2"]["due_at"] - (now - 10)) < 1e-3
    assert "due_at" not in entries["c-4"] and entries["c-4"]["detail"] == {"Email": "c-4@example.com"}


def test_every_early_call_counts_and_duplicates_stay_per_ledger_key(send):
    _, url = send(item_retry_rate=1.0)
    due = iso(time.time() + 60)
    post_batch(url, item("k1", scheduled_time=due))  # answered "retry": received early, not applied
    requests.post(f"{url}/_sim/config", json={"item_retry_rate": 0}, timeout=5)
    post_batch(url, item("k1", scheduled_time=due), item("k1-again", scheduled_time=due))
    state = ledger(url, full=True)
    assert state["early"] == 3 and state["timed_keys"] == 1
    assert state["applied"] == 2 and state["duplicate_sends"] == 1
    [entry] = state["entries"]
    assert entry["early"] == 3 and entry["applications"] == 2


@pytest.mark.parametrize("value", ["2026-11-29 02:00:00", "tomorrow", "2026-11-29T02:00:00", 5])
def test_scheduled_time_needs_an_iso_time_with_offset(send, value):
    _, url = send()
    batch = post_batch(url, item("k1", scheduled_time=value))
    assert batch.status_code == 400 and "scheduled_time" in batch.json()["error"]
