"""Send-campaign driver (flow 1) against the fake servers and a tiny stand-in relay written here."""

import json
import threading
import time
from datetime import datetime, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit
from zoneinfo import ZoneInfo

import pytest
import requests
from click.testing import CliRunner

from cli.simulate import simulate
from simulator import driver, roles, server
from simulator.send_driver import format_send_summary, run_send_campaign

API_KEY = "driver-key"
TOKEN = "listener-token"
AUTH = ("admin", "secret")
ATTRIBUTES = ("Email", "Country")


class StandInSendRelay:
    """Just enough flow 1: accepts EventTypeID 13, pages GetCustomerSendDetailsByChannel, and
    releases each send at its ScheduledTime (``mistake`` breaks one thing on purpose)."""

    def __init__(self, sim, zone="UTC", mistake=None, work=True):
        self.sim, self.zone, self.mistake, self.work = sim, zone, mistake, work
        self.lock = threading.Lock()
        self.runs, self.waiting = {}, []
        self.stopping = threading.Event()
        threading.Thread(target=self.release, daemon=True).start()

    def notify(self, body):
        lowered = {key.lower(): value for key, value in body.items()}
        key = (lowered["campaignid"], lowered["channelid"])
        with self.lock:
            if key in self.runs:
                return 200
            self.runs[key] = "running"
        if self.work:
            threading.Thread(target=self.process, args=key, daemon=True).start()
        return 202

    def due(self, text):
        zone = timezone.utc if self.mistake == "utc" else ZoneInfo(self.zone)
        fmt = "%Y-%m-%d %H:%M:%S" if len(text) > 16 else "%Y-%m-%d %H:%M"
        return datetime.strptime(text, fmt).replace(tzinfo=zone)

    def process(self, campaign_id, channel_id):
        skip, session, items = 0, requests.Session(), []
        while True:
            page = session.get(f"{self.sim.optimove_url}/customers/GetCustomerSendDetailsByChannel",
                               params={"ChannelID": channel_id, "CampaignID": campaign_id, "$top": 7, "$skip": skip,
                                       "CustomerAttributes": ";".join(ATTRIBUTES),
                                       "CustomerAttributesDelimiter": ","},
                               headers={"X-API-KEY": API_KEY}, timeout=5).json()
            for row in page:
                values = row.get("CustomerAttributes") or row["CustomerAttribute"].split(",")
                items.append({"idempotency_key": f"{campaign_id}:{channel_id}:{row['CustomerID']}",
                              "campaign_id": campaign_id, "channel_id": channel_id,
                              "template_id": row["TemplateID"], "customer_id": row["CustomerID"],
                              "attributes": dict(zip(ATTRIBUTES, values)), "promo_codes": [],
                              "scheduled_time": self.due(row["ScheduledTime"]).isoformat(), "source": "scheduled"})
            skip += len(page)
            if len(page) < 7:
                break
        if self.mistake == "twice":
            items.append({**items[-1], "idempotency_key": "another-key"})
        with self.lock:
            self.waiting += items
            self.runs[(campaign_id, channel_id)] = "done"

    def release(self):
        session = requests.Session()
        while not self.stopping.wait(0.02):
            now = time.time()
            with self.lock:
                due = [item for item in self.waiting if self.mistake == "early"
                       or datetime.fromisoformat(item["scheduled_time"]).timestamp() <= now]
                self.waiting = [item for item in self.waiting if item not in due]
            if due:
                session.post(self.sim.send_url, json={"sends": due}, timeout=5)
                if self.mistake != "early":
                    metrics = [{"ChannelID": due[0]["channel_id"], "CampaignID": due[0]["campaign_id"],
                                "TemplateID": 14, "MetricID": 0, "MetricValue": len(due)}]
                    session.post(f"{self.sim.optimove_url}/integrations/UpdateCampaignMetrics", json=metrics,
                                 headers={"X-API-KEY": API_KEY}, timeout=5)

    def status(self, campaign_id):
        with self.lock:
            runs = [{"channel_id": channel, "status": status}
                    for (campaign, channel), status in self.runs.items() if campaign == campaign_id]
        return {"campaign_id": campaign_id, "status": "done" if runs else "unknown", "runs": runs,
                "totals": {"runs": len(runs)}}


def serve_relay(relay):
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
            self.answer(200, relay.status(int(self.path.rsplit("/", 1)[1])))

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    httpd.daemon_threads = True
    threading.Thread(target=httpd.serve_forever, args=(0.05,), daemon=True).start()
    return httpd, f"http://127.0.0.1:{httpd.server_address[1]}"


@pytest.fixture
def world():
    """The fake servers + a stand-in relay factory; yields (sim, make_relay, drive)."""
    sim = server.start(0, 0, API_KEY)
    started = []

    def make_relay(**options):
        relay = StandInSendRelay(sim, **options)
        httpd, url = serve_relay(relay)
        started.append((relay, httpd))
        return relay, url

    def drive(relay_url, **options):
        options = {"customers_per_channel": 12, "spread": 1.0, "timeout": 5, "attributes": ATTRIBUTES, **options}
        return run_send_campaign(f"{relay_url}/listener?token={TOKEN}", sim.optimove_url, sim.send_admin_url,
                                 f"{relay_url}/api/campaigns", admin_auth=AUTH, **options)

    yield sim, make_relay, drive
    for relay, httpd in started:
        relay.stopping.set()
        httpd.shutdown()
        httpd.server_close()
    sim.stop()


def test_send_campaign_on_time_is_ok(world):
    sim, make_relay, drive = world
    _, url = make_relay(zone="Europe/Berlin")
    progress = []
    summary = drive(url, channels=(610, 611), timezone="Europe/Berlin", attribute_form="mixed", spread=3.0,
                    progress=lambda fraction, info: progress.append(fraction))
    assert summary["ok"] is True, summary
    assert summary["expected_sends"] == 24 and summary["sent"] == 24
    assert summary["early"] == summary["duplicates"] == summary["missing"] == 0
    assert summary["wrong_time"] == summary["wrong_attributes"] == summary["wrong_template"] == 0
    assert 6 <= summary["due_now"] <= 18 and summary["late_seconds"]["count"] == 24
    assert summary["late_seconds_future"]["count"] == 24 - summary["due_now"]
    assert 0 <= summary["late_seconds_future"]["max"] < 2.0  # released within 20 ms by the stand-in
    assert summary["relay_status"] == "done" and summary["metrics_reported"]
    assert progress and progress[-1] == 1.0
    text = format_send_summary(summary)
    assert "OK" in text and "early               0" in text and str(summary["campaign_id"]) in text


def test_early_sends_fail_the_run(world):
    _, make_relay, drive = world
    _, url = make_relay(mistake="early")
    summary = drive(url, due_now_fraction=0.0, spread=30.0, timeout=3)
    assert summary["ok"] is False and summary["early"] == 12 and summary["sent"] == 12
    assert "NOT OK" in format_send_summary(summary)


def test_duplicates_and_a_misread_time_zone_are_reported(world):
    _, make_relay, drive = world
    _, url = make_relay(mistake="twice")
    twice = drive(url, with_seconds=False, spread=0.0)
    assert twice["ok"] is False and twice["duplicates"] == 1 and twice["sent"] == 12
    _, url = make_relay(zone="America/New_York", mistake="utc")
    misread = drive(url, timezone="America/New_York", due_now_fraction=1.0, spread=0.0)
    assert misread["ok"] is False and misread["wrong_time"] == 12 and misread["early"] == 0
    assert "expected" in misread["wrong_examples"][0]


def test_wrong_attribute_names_are_reported(world):
    _, make_relay, drive = world
    _, url = make_relay()
    summary = drive(url, attributes={610: ("Email", "Tier")}, attribute_form="string", spread=0.0)
    assert summary["ok"] is False and summary["wrong_attributes"] == 12 and summary["sent"] == 12


def test_nothing_arrives_times_out_with_everything_missing(world):
    _, make_relay, drive = world
    _, url = make_relay(work=False)
    summary = drive(url, spread=0.0, timeout=0.3)
    assert summary["timed_out"] and summary["missing"] == 12 and summary["sent"] == 0 and not summary["ok"]
    assert len(summary["missing_sends"]) == 10 and summary["missing_sends"][0].startswith("610/C")


def test_a_campaign_id_already_in_the_ledger_is_refused(world):
    sim, make_relay, drive = world
    _, url = make_relay()
    requests.post(sim.send_url, json={"sends": [{
        "idempotency_key": "old", "campaign_id": 4242, "channel_id": 610, "template_id": 14, "customer_id": "C1",
        "attributes": {}, "promo_codes": [], "scheduled_time": None, "source": "scheduled"}]}, timeout=5)
    with pytest.raises(driver.DriverError, match="4242"):
        drive(url, campaign_id=4242)


def test_run_for_role_dispatches_to_the_send_driver(world):
    sim, make_relay, _ = world
    _, url = make_relay()
    summary = roles.run_for_role("send", f"{url}/listener?token={TOKEN}", sim.optimove_url, sim.send_admin_url,
                                  None, None, customers_per_channel=4, spread=0.0, attributes=ATTRIBUTES,
                                  timeout=5)
    assert summary["ok"] and summary["role"] == "send" and summary["relay_status"] is None
    assert "Send campaign" in roles.format_for_role(summary)
    with pytest.raises(ValueError, match="role"):
        roles.run_for_role("pigeon", "", "", "", None, None)


def test_cli_campaign_role_send_reads_up_json(world, tmp_path):
    sim, make_relay, _ = world
    _, url = make_relay(zone="Europe/Berlin")
    (tmp_path / "up.json").write_text(json.dumps({
        "listener_url": f"{url}/listener?token={TOKEN}", "url": url, "admin_user": AUTH[0],
        "admin_password": AUTH[1], "simulator": sim.urls(),
        "channels": {"504": "bonus", "610": {"role": "send", "attributes": list(ATTRIBUTES)}}}))
    result = CliRunner().invoke(simulate, [
        "campaign", "--data-dir", str(tmp_path), "--role", "send", "--customers", "6", "--spread", "1",
        "--timezone", "Europe/Berlin", "--no-seconds", "--attribute-form", "string", "--json"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.output)
    assert summary["ok"] and summary["channels"] == [610] and summary["attributes"] == {"610": list(ATTRIBUTES)}
    assert summary["with_seconds"] is False and summary["relay_status"] == "done"
    wrong = CliRunner().invoke(simulate, ["campaign", "--data-dir", str(tmp_path), "--role", "send",
                                          "--channels", "504"])
    assert wrong.exit_code == 2 and "role 'bonus'" in wrong.output
    zone = CliRunner().invoke(simulate, ["campaign", "--data-dir", str(tmp_path), "--role", "send",
                                         "--timezone", "Mars/Base"])
    assert zone.exit_code == 1 and "timezone" in zone.output


def test_caught_up_lateness_counts_only_sends_due_after_the_first_sends_arrived():
    """A send due while the campaign's sends due at once are still being delivered waits its turn
    (late_seconds_future); one due after they all arrived measures the release path alone."""
    from simulator.campaigns import ExpectedSend
    from simulator.send_driver import _check

    fired = 1_000_000.0

    def send(customer, due):
        return ExpectedSend(610, customer, 14, datetime.fromtimestamp(due, timezone.utc), {})

    def entry(customer, due, received):
        return {"key": ["send", 610, customer, 14, None], "applications": 1, "rejections": 0,
                "due_at": due, "detail": {}, "first_received_at": received}

    plan = [("a", fired - 50, fired + 4.0),   # due at once, the last of them arrives 4 s later
            ("b", fired - 10, fired + 3.0),
            ("c", fired + 1, fired + 4.5),    # due while the backlog drains: 3.5 s late
            ("d", fired + 6, fired + 6.25),   # due after it: 0.25 s late
            ("e", fired + 9, fired + 11.5)]   # 2.5 s late
    expected = {(610, c): send(c, due) for c, due, _ in plan}
    checked = _check([entry(c, due, received) for c, due, received in plan], expected, fired)
    assert checked["late_seconds_future"]["count"] == 3 and checked["late_seconds_future"]["max"] == 3.5
    assert checked["late_seconds_caught_up"]["count"] == 2 and checked["late_seconds_caught_up"]["max"] == 2.5
