"""Campaign driver against the two fake servers and a tiny stand-in relay written here."""

import base64
import json
import random
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit

import pytest
import requests

from simulator import driver, server

API_KEY = "driver-key"
TOKEN = "listener-token"
AUTH = ("admin", "secret")


class StandInRelay:
    """Just enough relay: accepts EventTypeID 13, pages Optimove, grants once per triple."""

    def __init__(self, optimove_url, bonus_url, work=True):
        self.optimove_url, self.bonus_url, self.work = optimove_url, bonus_url, work
        self.lock = threading.Lock()
        self.runs = {}
        self.claimed = set()
        self.notifications = []

    def notify(self, body):
        lowered = {key.lower(): value for key, value in body.items()}
        key = (lowered["campaignid"], lowered["channelid"])
        with self.lock:
            self.notifications.append(body)
            if key in self.runs:
                return 200
            self.runs[key] = {"run_id": len(self.runs) + 1, "channel_id": key[1], "status": "running",
                              "fetched": 0, "claimed": 0, "duplicates_skipped": 0, "granted": 0,
                              "rejected": 0, "failed": 0, "pages_fetched": 0}
        if self.work:
            threading.Thread(target=self.process, args=key, daemon=True).start()
        return 202

    def process(self, campaign_id, channel_id):
        run, skip, session = self.runs[(campaign_id, channel_id)], 0, requests.Session()
        while True:
            page = session.get(f"{self.optimove_url}/customers/GetCustomerExecutionDetailsByCampaign",
                               params={"CampaignID": campaign_id, "ChannelID": channel_id, "$top": 10, "$skip": skip},
                               headers={"X-API-KEY": API_KEY}, timeout=5).json()
            grants = []
            with self.lock:
                run["pages_fetched"] += 1
                run["fetched"] += len(page)
                for row in page:
                    codes = row["PromoCode"] if isinstance(row["PromoCode"], list) else row["PromoCode"].split(",")
                    for code in codes:
                        triple = (campaign_id, row["CustomerID"], code)
                        if triple in self.claimed:
                            run["duplicates_skipped"] += 1
                            continue
                        self.claimed.add(triple)
                        run["claimed"] += 1
                        grants.append({"idempotency_key": ":".join(map(str, triple)), "campaign_id": campaign_id,
                                       "channel_id": channel_id, "customer_id": row["CustomerID"],
                                       "promo_code": code, "source": "scheduled"})
            if grants:
                results = session.post(self.bonus_url, json={"grants": grants}, timeout=5).json()["results"]
                with self.lock:
                    run["granted"] += sum(r["status"] == "granted" for r in results)
            skip += len(page)
            if len(page) < 10:
                break
        with self.lock:
            run["status"] = "done"

    def status(self, campaign_id):
        with self.lock:
            runs = [dict(run) for (campaign, _), run in self.runs.items() if campaign == campaign_id]
        totals = {name: sum(run[name] for run in runs)
                  for name in ("fetched", "claimed", "duplicates_skipped", "granted", "rejected", "failed")}
        finished = runs and all(run["status"] == "done" for run in runs)
        return {"campaign_id": campaign_id, "status": "done" if finished else "running", "runs": runs,
                "totals": totals}


def serve_relay(relay):
    expected_auth = "Basic " + base64.b64encode(":".join(AUTH).encode()).decode()

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def answer(self, status, body):
            payload = json.dumps(body).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)

        def do_POST(self):
            url = urlsplit(self.path)
            if url.path != "/listener" or parse_qs(url.query).get("token") != [TOKEN]:
                return self.answer(401, {"error": "bad token"})
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            self.answer(relay.notify(body), {"accepted": True})

        def do_GET(self):
            match = re.fullmatch(r"/api/campaigns/(\d+)", self.path)
            if self.headers.get("Authorization") != expected_auth:
                return self.answer(401, {"error": "auth"})
            if not match:
                return self.answer(404, {"error": "not found"})
            self.answer(200, relay.status(int(match.group(1))))

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    httpd.daemon_threads = True
    threading.Thread(target=httpd.serve_forever, args=(0.05,), daemon=True).start()
    return httpd, f"http://127.0.0.1:{httpd.server_address[1]}"


@pytest.fixture
def world():
    """Fake Optimove + fake bonus system + a stand-in relay factory."""
    sim = server.start(0, 0, API_KEY)
    relays = []

    def relay(work=True):
        stand_in = StandInRelay(sim.optimove_url, sim.bonus_url, work)
        httpd, url = serve_relay(stand_in)
        relays.append(httpd)
        return stand_in, url

    yield sim, relay
    for httpd in relays:
        httpd.shutdown()
        httpd.server_close()
    sim.stop()


def test_run_campaign_reports_ok_summary(world):
    sim, make_relay = world
    relay, relay_url = make_relay()
    progress = []
    summary = driver.run_campaign(
        f"{relay_url}/listener?token={TOKEN}", sim.optimove_url, sim.bonus_admin_url,
        f"{relay_url}/api/campaigns", admin_auth=AUTH, customers_per_channel=30, overlap=0.5,
        campaign_id=424242, timeout=10, progress=lambda fraction, status: progress.append(fraction))
    assert summary["ok"] is True
    assert summary["expected_triples"] == 90 and summary["granted_at_bonus_system"] == 90
    assert summary["duplicate_grants"] == 0 and summary["customers_per_channel"] == {504: 30, 505: 30, 506: 30}
    assert summary["relay_totals"]["duplicates_skipped"] > 0
    assert progress and progress[-1] == 1.0
    assert len(relay.notifications) == 4
    assert {frozenset(n) for n in relay.notifications} >= {
        frozenset({"EventTypeID", "TimeStamp", "CampaignID", "ChannelID"}),
        frozenset({"eventTypeId", "timeStamp", "campaignId", "channelId"})}
    text = driver.format_summary(summary)
    assert "424242" in text and "OK" in text and "90" in text


def test_summary_reports_only_the_ledger_delta(world):
    sim, make_relay = world
    requests.post(sim.bonus_url, json={"grants": [{"idempotency_key": "old", "campaign_id": 1,
                                                   "customer_id": "C1", "promo_code": "WB23"}]}, timeout=5)
    _, relay_url = make_relay()
    summary = driver.run_campaign(f"{relay_url}/listener?token={TOKEN}", sim.optimove_url, sim.bonus_admin_url,
                                  f"{relay_url}/api/campaigns/{{campaign_id}}", admin_auth=AUTH,
                                  channels=(504, 505), customers_per_channel=10, overlap=0.0,
                                  multi_code_every=0, timeout=10)
    assert summary["ok"] and summary["granted_at_bonus_system"] == 20
    assert 100000 <= summary["campaign_id"] <= 999999


def test_timeout_names_last_status(world):
    sim, make_relay = world
    _, relay_url = make_relay(work=False)
    with pytest.raises(TimeoutError, match="running"):
        driver.run_campaign(f"{relay_url}/listener?token={TOKEN}", sim.optimove_url, sim.bonus_admin_url,
                            f"{relay_url}/api/campaigns", admin_auth=AUTH, customers_per_channel=5,
                            campaign_id=5555, timeout=0.3)


def test_listener_error_is_reported(world):
    sim, make_relay = world
    _, relay_url = make_relay()
    with pytest.raises(driver.DriverError, match="401"):
        driver.run_campaign(f"{relay_url}/listener?token=wrong", sim.optimove_url, sim.bonus_admin_url,
                            f"{relay_url}/api/campaigns", admin_auth=AUTH, customers_per_channel=5, timeout=1)


def test_notification_bodies_shuffled_with_one_duplicate():
    bodies = driver.notification_bodies(7, [504, 505, 506], random.Random(3))
    channels = [b.get("ChannelID", b.get("channelId")) for b in bodies]
    assert len(bodies) == 4 and sorted(set(channels)) == [504, 505, 506]
    first_seen = {}
    for index, channel in enumerate(channels):
        first_seen.setdefault(channel, index)
    duplicate = next(c for c in set(channels) if channels.count(c) == 2)
    assert channels.index(duplicate, first_seen[duplicate] + 1) > first_seen[duplicate]


def test_campaign_status_url_forms():
    assert driver.campaign_status_url("http://r/api/campaigns", 9) == "http://r/api/campaigns/9"
    assert driver.campaign_status_url("http://r/api/campaigns/9", 9) == "http://r/api/campaigns/9"
    assert driver.campaign_status_url("http://r/x/{campaign_id}/s", 9) == "http://r/x/9/s"
