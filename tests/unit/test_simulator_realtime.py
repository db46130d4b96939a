"""Real-time driver against the fake bonus system / send service and a stand-in listener written here."""

import itertools
import json
import queue
import threading
import time

import pytest
import requests
from click.testing import CliRunner
from werkzeug.serving import make_server
from werkzeug.wrappers import Request, Response

from cli.simulate import _realtime_channel, simulate
from shared.schemas import parse_notification
from simulator import realtime, server
from simulator.realtime import percentiles, recased, run_realtime, trigger_body


class StandInListener:
    """Just enough relay for EventTypeID 11: dedupe by the relay's own key, 202 then forward.

    ``drop`` names customers whose effect is never forwarded; ``dedupe=False`` accepts repeats
    as new notifications; ``twice`` forwards some customers under a second idempotency key;
    ``refuse`` answers 503 to some customers; ``delay(customer)`` is the processing time in
    seconds before forwarding (the forwarders run in parallel, so one delay does not hold up others).
    """

    FORWARDERS = 12

    def __init__(self, role, peer_url, drop=(), dedupe=True, twice=(), refuse=(), delay=None):
        self.role, self.peer_url = role, peer_url
        self.drop, self.dedupe, self.twice, self.refuse = set(drop), dedupe, set(twice), set(refuse)
        self.delay = delay
        self.lock = threading.Lock()
        self.seen, self.bodies = {}, []
        self.ids = itertools.count(1)
        self.work = queue.Queue()
        for _ in range(self.FORWARDERS):
            threading.Thread(target=self.forward_all, daemon=True).start()

    def __call__(self, environ, start_response):
        request = Request(environ)
        body = request.get_json()
        notification = parse_notification(body)
        if notification.customer_id.endswith(tuple(self.refuse)):
            return Response("{}", 503, content_type="application/json")(environ, start_response)
        with self.lock:
            self.bodies.append(body)
            known = self.seen.get(notification.dedupe_key) if self.dedupe else None
            if known is None:
                known = self.seen[notification.dedupe_key] = next(self.ids)
                self.work.put((known, notification, body))
                status, answer = 202, {"status": "accepted", "notification_id": known}
            else:
                status, answer = 200, {"status": "duplicate", "notification_id": known}
        return Response(json.dumps(answer), status, content_type="application/json")(environ, start_response)

    def forward_all(self):
        session = requests.Session()
        while (job := self.work.get()) is not None:
            notification_id, notification, body = job
            customer = notification.customer_id
            if customer.endswith(tuple(self.drop)):
                continue
            if self.delay:
                time.sleep(self.delay(customer))  # simulated processing time, not synchronisation
            # both copies in one call, so the fake has them both before the driver can see either
            salts = ("a", "b") if customer.endswith(tuple(self.twice)) else ("a",)
            self.forward(session, notification_id, notification, body, salts)

    def forward(self, session, notification_id, notification, body, salts):
        common = {"campaign_id": notification.campaign_id, "channel_id": notification.channel_id,
                  "customer_id": notification.customer_id, "source": "realtime",
                  "notification_id": notification_id}
        if self.role == "bonus":
            grants = [{**common, "idempotency_key": f"{notification_id}-{code}-{salt}", "promo_code": code}
                      for code in notification.promo_codes for salt in salts]
            self.post(session, f"{self.peer_url}/bonus/grants", {"grants": grants})
        else:
            attributes = {key: value for key, value in body.items() if key.lower() in ("email", "firstname")}
            sends = [{**common, "idempotency_key": f"{notification_id}-{salt}", "template_id": notification.template_id,
                      "attributes": attributes, "promo_codes": notification.promo_codes, "scheduled_time": None}
                     for salt in salts]
            self.post(session, f"{self.peer_url}/send/sends", {"sends": sends})

    @staticmethod
    def post(session, url, body):
        """Post until the peer answers 200 (it may inject 503s), as the relay retries."""
        for _ in range(50):
            if session.post(url, json=body, timeout=5).status_code == 200:
                return
            time.sleep(0.05)  # the relay's backoff, shortened


@pytest.fixture
def world():
    """The simulator's fakes and a factory of stand-in listeners: listener(role, **behaviour) -> (stand_in, url)."""
    sim = server.start(api_key="rt-key")
    started = []

    def listener(role="bonus", **behaviour):
        peer = sim.bonus_admin_url if role == "bonus" else sim.send_admin_url
        stand_in = StandInListener(role, peer, **behaviour)
        httpd = make_server("127.0.0.1", 0, stand_in, threaded=True)
        threading.Thread(target=httpd.serve_forever, args=(0.05,), daemon=True).start()
        started.append((httpd, stand_in))
        return stand_in, f"http://127.0.0.1:{httpd.server_port}/optimove/events?token=T"

    yield sim, listener
    for httpd, stand_in in started:
        httpd.shutdown()
        for _ in range(stand_in.FORWARDERS):
            stand_in.work.put(None)
    sim.stop()


def test_bonus_run_is_ok_and_counts_every_code(world):
    sim, listener = world
    stand_in, url = listener("bonus")
    phases = []
    summary = run_realtime(url, sim.bonus_admin_url, "bonus", 600, campaign_id=4711, rate=100, duration=0.4,
                           duplicate_every=4, timeout=10, progress=lambda *args: phases.append(args))
    assert summary["ok"], summary
    assert summary["sent"] == summary["accepted"] == 40
    assert summary["resent"] == summary["duplicates_answered"] == 10
    codes = sum(len(trigger_body("bonus", i, 4711, 600, "c", "t")[1]) for i in range(40))
    assert codes > 40 and summary["expected_effects"] == summary["effects_seen"] == codes
    assert summary["lost"] == 0 and summary["duplicate_effects"] == 0 and summary["errors"] == {}
    assert summary["latency_ms"]["count"] == 40 and 0 <= summary["latency_ms"]["p50"] <= summary["latency_ms"]["max"]
    assert 0 < summary["achieved_rate"] <= 100 and summary["send_lag_ms_max"] >= 0
    assert phases[-1][0] == "waiting" and phases[-1][1] == phases[-1][2] == codes
    assert ("sending", 40, 40) in phases
    spellings = {frozenset(key for key in body if key.lower() == "customerid") for body in stand_in.bodies}
    assert {frozenset({"CustomerID"}), frozenset({"customerId"}), frozenset({"customerID"})} <= spellings
    assert any(isinstance(body.get("promoCode"), str) and "," in body["promoCode"] for body in stand_in.bodies)
    text = realtime.format_realtime_summary(summary)
    assert "4711" in text and "OK" in text and "600" in text and "p99" in text


def test_send_run_is_ok_and_counts_one_effect_per_customer(world):
    sim, listener = world
    _, url = listener("send")
    summary = run_realtime(url, sim.send_admin_url, "send", 610, rate=100, duration=0.3, duplicate_every=3,
                           timeout=10)
    assert summary["ok"], summary
    assert summary["expected_effects"] == summary["effects_seen"] == summary["accepted"] == 30
    assert summary["duplicates_answered"] == 10
    entries = requests.get(f"{sim.send_admin_url}/_sim/ledger?full=1", timeout=5).json()["entries"]
    assert len(entries) == 30 and {e["key"][3] for e in entries} == {14, 15, 16}


def test_lost_effect_is_detected_after_the_timeout(world):
    sim, listener = world
    _, url = listener("bonus", drop=["000003"])
    summary = run_realtime(url, sim.bonus_admin_url, "bonus", 600, rate=50, duration=0.2, timeout=0.5)
    assert not summary["ok"] and summary["timed_out"]
    assert summary["lost"] == 1 and summary["lost_customers"][0].endswith("000003")
    assert summary["effects_seen"] == summary["expected_effects"] - 1
    assert summary["latency_ms"]["count"] == 9
    assert "lost                1" in realtime.format_realtime_summary(summary)


def test_duplicate_effects_and_repeats_answered_as_new(world):
    sim, listener = world
    _, url = listener("bonus", dedupe=False)
    summary = run_realtime(url, sim.bonus_admin_url, "bonus", 600, rate=50, duration=0.2, duplicate_every=5,
                           timeout=5)
    assert not summary["ok"] and summary["lost"] == 0
    assert summary["resent"] == 2 and summary["duplicates_answered"] == 0
    resent_codes = sum(len(trigger_body("bonus", i, 1, 600, "c", "t")[1]) for i in (4, 9))
    assert summary["duplicate_effects"] == resent_codes


def test_same_notification_granted_twice_is_a_duplicate_effect(world):
    sim, listener = world
    _, url = listener("send", twice=["000002"])
    summary = run_realtime(url, sim.send_admin_url, "send", 610, rate=50, duration=0.2, timeout=5)
    assert not summary["ok"] and summary["duplicate_effects"] == 1 and summary["lost"] == 0
    assert requests.get(f"{sim.send_admin_url}/_sim/ledger", timeout=5).json()["duplicate_sends"] == 1


def test_non_2xx_answers_are_counted(world):
    sim, listener = world
    _, url = listener("bonus", refuse=["000001", "000002"])
    summary = run_realtime(url, sim.bonus_admin_url, "bonus", 600, rate=50, duration=0.2, timeout=5)
    assert not summary["ok"] and summary["errors"] == {"503": 2}
    assert summary["accepted"] == 8 and summary["lost"] == 0


def test_counts_only_its_own_customers(world):
    sim, listener = world
    _, url = listener("bonus")
    other = {"idempotency_key": "old", "campaign_id": 77, "customer_id": "rt-other-1", "promo_code": "RT10"}
    requests.post(sim.bonus_url, json={"grants": [other, {**other, "idempotency_key": "old2"}]}, timeout=5)
    first = run_realtime(url, sim.bonus_admin_url, "bonus", 600, campaign_id=77, rate=50, duration=0.2, timeout=5)
    second = run_realtime(url, sim.bonus_admin_url, "bonus", 600, campaign_id=77, rate=50, duration=0.2, timeout=5)
    assert first["ok"] and second["ok"], (first, second)
    assert first["customer_prefix"] != second["customer_prefix"]
    assert first["duplicate_effects"] == second["duplicate_effects"] == 0


def test_latency_percentiles_follow_the_relay_processing_time(world):
    sim, listener = world
    _, url = listener("send", delay=lambda customer: int(customer[-1]) * 0.02)
    summary = run_realtime(url, sim.send_admin_url, "send", 610, rate=50, duration=0.2, timeout=5)
    latency = summary["latency_ms"]
    assert summary["ok"] and latency["count"] == 10
    # delays are 0, 20, ..., 180 ms: nearest rank gives 80 ms for p50 and 180 ms for p95, p99, max
    assert 70 <= latency["p50"] < 130 and 170 <= latency["p95"] <= latency["p99"] <= latency["max"] < 260


def test_latency_ends_when_the_call_reaches_the_fake(world):
    sim, listener = world
    requests.post(f"{sim.bonus_admin_url}/_sim/config", json={"latency_ms": 300}, timeout=5)
    _, url = listener("bonus")
    summary = run_realtime(url, sim.bonus_admin_url, "bonus", 600, rate=20, duration=0.25, timeout=5)
    # the fake notes arrival before its injected latency, so that latency does not count
    assert summary["ok"] and summary["latency_ms"]["max"] < 200
    assert summary["applied_latency_ms"]["count"] == 5 and summary["applied_latency_ms"]["max"] < 200


def test_applied_latency_includes_the_retries_after_a_failure(world):
    sim, listener = world
    requests.post(f"{sim.send_admin_url}/_sim/config", json={"failure_rate": 0.5, "seed": 3}, timeout=5)
    _, url = listener("send")
    summary = run_realtime(url, sim.send_admin_url, "send", 610, rate=50, duration=0.2, timeout=10)
    first, applied = summary["latency_ms"], summary["applied_latency_ms"]
    assert summary["ok"] and first["count"] == applied["count"] == 10
    assert applied["max"] >= 45 and applied["max"] >= first["max"] and applied["p50"] >= first["p50"]
    assert "202 -> applied" in realtime.format_realtime_summary(summary)


def test_percentiles_use_nearest_rank():
    values = [float(v) for v in range(1, 101)]
    assert percentiles(values) == {"p50": 50.0, "p95": 95.0, "p99": 99.0, "max": 100.0, "count": 100}
    assert percentiles([3.0]) == {"p50": 3.0, "p95": 3.0, "p99": 3.0, "max": 3.0, "count": 1}
    assert percentiles([])["p50"] is None


def test_bodies_parse_as_the_relay_parses_them_and_recased_repeats_dedupe():
    for role in ("bonus", "send"):
        for index in range(12):
            body, codes = trigger_body(role, index, 9001, 600, f"c-{index}", "2026-11-28 10:00:00")
            parsed = parse_notification(body)
            assert (parsed.event_type, parsed.campaign_id, parsed.channel_id) == (11, 9001, 600)
            assert parsed.customer_id == f"c-{index}" and parsed.promo_codes == codes
            assert parsed.template_id == (None if role == "bonus" else (14, 15, 16)[index % 3])
            again = recased(body, index)
            assert set(again) != set(body) and parse_notification(again).dedupe_key == parsed.dedupe_key
    assert [len(trigger_body("send", i, 1, 2, "c", "t")[1]) > 0 for i in range(4)] == [True, False, True, False]


def test_realtime_channel_choice():
    info = {"channels": {"504": "bonus", "600": "bonus", "610": "send", "505": "send"}}
    assert _realtime_channel(info, "bonus", None) == 600
    assert _realtime_channel(info, "send", None) == 610
    assert _realtime_channel({"channels": {"504": "bonus"}}, "bonus", None) == 504
    assert _realtime_channel(info, "send", 777) == 777
    with pytest.raises(Exception, match="RELAY_CHANNEL_CONFIG"):
        _realtime_channel({"channels": {"504": "bonus"}}, "send", None)
    with pytest.raises(Exception, match="role 'bonus'"):
        _realtime_channel(info, "send", 600)


def test_cli_realtime_reads_up_json(world, tmp_path):
    sim, listener = world
    _, url = listener("send")
    (tmp_path / "up.json").write_text(json.dumps({
        "listener_url": url, "simulator": sim.urls(), "channels": {"504": "bonus", "610": "send"}}))
    result = CliRunner().invoke(simulate, ["realtime", "--data-dir", str(tmp_path), "--role", "send",
                                           "--rate", "50", "--duration", "0.2", "--json"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.output)
    assert summary["ok"] and summary["channel_id"] == 610 and summary["role"] == "send"
    text = CliRunner().invoke(simulate, ["realtime", "--data-dir", str(tmp_path), "--rate", "50",
                                         "--duration", "0.1", "--timeout", "0.3"])
    assert text.exit_code == 1 and "NOT OK" in text.output  # channel 504 goes to a send-role stand-in
    missing = CliRunner().invoke(simulate, ["realtime", "--data-dir", str(tmp_path / "nowhere")])
    assert missing.exit_code == 1 and "up.json" in missing.output
