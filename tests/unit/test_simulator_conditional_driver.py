"""Conditional-execution driver (flow 4) and cancellations against the fake servers and a tiny
stand-in relay written here."""

import json
import threading
import time
from datetime import datetime, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit

import pytest
import requests
from click.testing import CliRunner

from cli.simulate import simulate
from simulator import campaigns, server
from simulator.conditional_driver import (REJECT_CODE, cancel_campaign, conditional_spec,
                                          format_conditional_summary, optimove_time, run_conditional)
from simulator.driver import DriverError

API_KEY = "driver-key"
TOKEN = "listener-token"


class StandInConditionalRelay:
    """Just enough flow 4: on EventTypeID 5 pages GetProcessedCampaignCustomers, grants each page and
    reports it; on EventTypeID 4 stops granting the cancelled customers and revokes their grants.
    ``mistake`` breaks one thing on purpose; ``pause`` slows each page down; ``stop_on_cancel`` stops
    the whole run at a cancellation (as the relay does), not just the cancelled customers."""

    def __init__(self, sim, mistake=None, page=10, report_batch=7, pause=0.0, stop_on_cancel=False):
        self.sim, self.mistake, self.page, self.report_batch, self.pause = sim, mistake, page, report_batch, pause
        self.stop_on_cancel, self.stopped = stop_on_cancel, False
        self.lock = threading.Lock()
        self.notifications = []
        self.cancelled: set[tuple] = set()  # (campaign, customer): customer ids repeat across campaigns
        self.references: dict[tuple, str] = {}
        self.headers = {"X-API-KEY": API_KEY}

    def notify(self, body):
        with self.lock:
            self.notifications.append(body)
        target = {5: self.process, 4: self.cancel}.get(body.get("EventTypeID"))
        if target and self.mistake != "idle":
            threading.Thread(target=target, args=(body,), daemon=True).start()
        return 202

    def process(self, body):
        campaign_id, session, skip = body["CampaignID"], requests.Session(), 0
        deadline = datetime.strptime(body["ClearanceRequiredBy"], "%Y-%m-%d %H:%M:%S").replace(tzinfo=timezone.utc)
        while True:
            time.sleep(self.pause)
            page = session.get(f"{self.sim.optimove_url}/customers/GetProcessedCampaignCustomers",
                               params={"CampaignID": campaign_id, "$top": self.page, "$skip": skip},
                               headers=self.headers, timeout=5).json()
            with self.lock:
                if self.stopped:
                    return
                rows = [row for row in page if (campaign_id, row["CustomerID"]) not in self.cancelled]
            grants = [{"idempotency_key": f"g:{campaign_id}:{row['CustomerID']}:{code}", "campaign_id": campaign_id,
                       "customer_id": row["CustomerID"], "promo_code": code, "source": "conditional"}
                      for row in rows
                      for code in (row["PromoCode"] if isinstance(row["PromoCode"], list)
                                   else row["PromoCode"].split(","))]
            if self.mistake == "approve_without_grant":
                grants = grants[: len(grants) // 2]
            results = session.post(self.sim.bonus_url, json={"grants": grants}, timeout=5).json()["results"] \
                if grants else []
            ok: dict[str, bool] = {row["CustomerID"]: True for row in rows}
            with self.lock:
                for item, result in zip(grants, results):
                    if result["status"] == "granted":
                        self.references[(campaign_id, item["customer_id"], item["promo_code"])] = result["reference"]
                    else:
                        ok[item["customer_id"]] = False
                late = [key for key in self.references
                        if key[0] == campaign_id and key[:2] in self.cancelled and key[1] in ok]
            self.revoke(campaign_id, late, session)
            if self.mistake == "late":
                time.sleep(max(0.0, deadline.timestamp() - time.time() + 0.3))
            if self.mistake == "approve_without_grant":
                ok = dict.fromkeys(ok, True)
            statuses = [{"CustomerID": c, "Status": s} for c, s in ok.items()]
            for start in range(0, len(statuses), self.report_batch):
                session.post(f"{self.sim.optimove_url}/integrations/UpdateCustomerPromotionStatus",
                             json={"TimeStamp": "2026-11-27 10:00:00", "CampaignID": campaign_id,
                                   "PromosUpdated": statuses[start:start + self.report_batch]},
                             headers=self.headers, timeout=5)
            skip += len(page)
            if len(page) < self.page:
                return

    def cancel(self, body):
        campaign_id, session = body["CampaignID"], requests.Session()
        rows = session.get(f"{self.sim.optimove_url}/customers/GetCanceledCampaignCustomers",
                           params={"CampaignID": campaign_id}, headers=self.headers, timeout=5).json()
        with self.lock:
            self.stopped = self.stop_on_cancel
            self.cancelled |= {(campaign_id, row["CustomerID"]) for row in rows}
            granted = [key for key in self.references if key[0] == campaign_id and key[:2] in self.cancelled]
        self.revoke(campaign_id, granted, session)
        if self.mistake == "double_revoke":
            self.revoke(campaign_id, granted, session, prefix="again")

    def revoke(self, campaign_id, keys, session, prefix="r"):
        if not keys:
            return
        revokes = [{"idempotency_key": f"{prefix}:{campaign_id}:{customer}:{code}", "campaign_id": campaign_id,
                    "customer_id": customer, "promo_code": code, "reference": self.references[key]}
                   for key in keys for _, customer, code in [key]]
        results = session.post(self.sim.bonus_revoke_url, json={"revokes": revokes}, timeout=5).json()["results"]
        assert all(result["status"] == "revoked" for result in results), results


def serve_relay(relay):
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def do_POST(self):
            url = urlsplit(self.path)
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            status = relay.notify(body) if parse_qs(url.query).get("token") == [TOKEN] else 401
            self.send_response(status)
            self.send_header("Content-Length", "0")
            self.end_headers()

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    httpd.daemon_threads = True
    threading.Thread(target=httpd.serve_forever, args=(0.05,), daemon=True).start()
    return httpd, f"http://127.0.0.1:{httpd.server_address[1]}/listener?token={TOKEN}"


@pytest.fixture
def world():
    """Fake Optimove + fake bonus system + a stand-in relay factory."""
    sim = server.start(0, 0, API_KEY)
    relays = []

    def relay(**options):
        stand_in = StandInConditionalRelay(sim, **options)
        httpd, listener = serve_relay(stand_in)
        relays.append(httpd)
        return stand_in, listener

    yield sim, relay
    for httpd in relays:
        httpd.shutdown()
        httpd.server_close()
    sim.stop()


def test_run_conditional_ok_with_rejected_customers(world):
    sim, make_relay = world
    relay, listener = make_relay()
    progress = []
    summary = run_conditional(listener, sim.optimove_url, sim.bonus_admin_url, customers=40, deadline_in=20,
                              campaign_id=515151, multi_code_every=3, reject_every=4, timeout=1,
                              progress=lambda fraction, status: progress.append(fraction))
    assert summary["ok"] is True, summary
    assert summary["customers"] == 40 and summary["expected_false"] == 10 and summary["expected_approved"] == 30
    assert summary["granted_at_bonus_system"] == 30 and summary["customers_rejected"] == 10
    assert summary["approved_before_deadline"] == 30 and summary["reported_false"] == 10
    assert summary["unreported"] == 0 and summary["missed"] == 0 and summary["approved_after_deadline"] == 0
    assert summary["grants_after_deadline"] == 0 and summary["granted_not_approved"] == 0
    assert summary["grants_applied"] == 40 + 14  # WB23 for everyone, NV10 for every 3rd; NOGRANT never
    assert summary["max_report_call_size"] == 7 and summary["report_calls"] == 8
    assert 0 < summary["max_requests_in_window"] <= summary["rate_limit"] == 50 and summary["throttled"] == 0
    assert summary["timed_out"] is False and summary["seconds"] < 10
    assert summary["cancelled"] == 0 and summary["revoked"] == 0
    assert progress and progress[-1] == 1.0
    [body] = relay.notifications
    assert set(body) == {"EventTypeID", "TimeStamp", "CampaignID", "ClearanceRequiredBy"}
    assert body["EventTypeID"] == 5 and body["CampaignID"] == 515151
    assert body["ClearanceRequiredBy"] == summary["clearance_required_by"]
    assert abs(datetime.strptime(body["ClearanceRequiredBy"], "%Y-%m-%d %H:%M:%S")
               .replace(tzinfo=timezone.utc).timestamp() - summary["deadline"]) < 1e-6
    assert REJECT_CODE in sim.bonus.config.reject_codes
    text = format_conditional_summary(summary)
    assert "515151" in text and "OK" in text and "30 of 30" in text and "every 4th also holds NOGRANT" in text
    assert "every 3rd holds all" in text


def test_late_reports_are_counted_and_fail_the_run(world):
    sim, make_relay = world
    _, listener = make_relay(mistake="late")
    summary = run_conditional(listener, sim.optimove_url, sim.bonus_admin_url, customers=12, deadline_in=1.5,
                              multi_code_every=0, timeout=1.5)
    assert summary["ok"] is False
    assert summary["approved_after_deadline"] > 0 and summary["report_calls_after_deadline"] > 0
    assert summary["missed"] == summary["approved_after_deadline"]
    assert summary["granted_not_approved"] == summary["missed"]
    assert "NOT OK" in format_conditional_summary(summary)


def test_approving_customers_without_their_grants_fails_the_run(world):
    sim, make_relay = world
    _, listener = make_relay(mistake="approve_without_grant")
    summary = run_conditional(listener, sim.optimove_url, sim.bonus_admin_url, customers=20, deadline_in=20,
                              reject_every=5, timeout=0.5)
    assert summary["ok"] is False and summary["approved_without_grant"] > 0
    assert summary["approved_without_grant"] >= summary["expected_false"] == 4


def test_idle_relay_is_watched_until_after_the_deadline(world):
    sim, make_relay = world
    _, listener = make_relay(mistake="idle")
    started = time.monotonic()
    summary = run_conditional(listener, sim.optimove_url, sim.bonus_admin_url, customers=5, deadline_in=1,
                              timeout=0.3)
    assert summary["unreported"] == 5 and summary["missed"] == 5 and summary["granted_at_bonus_system"] == 0
    assert summary["timed_out"] is True and summary["ok"] is False
    assert time.monotonic() - started >= 0.3 and summary["seconds"] <= 1 + 0.3 + 1


def test_cancellation_mid_run_revokes_the_cancelled_grants(world):
    sim, make_relay = world
    relay, listener = make_relay(pause=0.3)
    summary = run_conditional(listener, sim.optimove_url, sim.bonus_admin_url, customers=40, deadline_in=20,
                              campaign_id=626262, cancel_after=0.8, cancel_customers=0.5, timeout=5)
    assert summary["ok"] is True, summary
    spec = campaigns.validate_spec(conditional_spec(626262, 40))
    assert summary["cancelled"] == len(campaigns.cancelled_numbers(spec, 0.5)) > 0
    assert summary["cancelled_granted"] > 0 and summary["revoked"] > 0
    assert summary["cancelled_not_revoked"] == 0 and summary["revoked_not_cancelled"] == 0
    assert summary["double_revokes"] == 0 and summary["missed"] == 0
    assert [body["EventTypeID"] for body in relay.notifications] == [5, 4]
    assert set(relay.notifications[1]) == {"EventTypeID", "TimeStamp", "CampaignID"}
    ledger = requests.get(f"{sim.bonus_admin_url}/_sim/ledger", timeout=5).json()
    assert ledger["revoked"] == summary["revoked"] and ledger["double_revokes"] == 0
    assert "cancelled" in format_conditional_summary(summary)


def test_a_run_stopped_by_a_partial_cancellation_is_ok(world):
    sim, make_relay = world
    _, listener = make_relay(pause=0.3, stop_on_cancel=True)
    summary = run_conditional(listener, sim.optimove_url, sim.bonus_admin_url, customers=40, deadline_in=20,
                              cancel_after=0.5, cancel_customers=0.3, timeout=5)
    assert summary["ok"] is True, summary
    assert summary["missed"] > 0 and summary["unreported"] > 0 and summary["timed_out"] is False
    assert summary["cancelled_not_revoked"] == 0 and summary["seconds"] < 5


def test_double_revokes_fail_the_run(world):
    sim, make_relay = world
    _, listener = make_relay(mistake="double_revoke")
    summary = run_conditional(listener, sim.optimove_url, sim.bonus_admin_url, customers=10, deadline_in=20,
                              cancel_after=0.5, timeout=2)
    assert summary["cancelled"] == 10 and summary["double_revokes"] > 0 and summary["ok"] is False


def test_cancel_campaign_marks_and_notifies(world):
    sim, make_relay = world
    relay, listener = make_relay()
    requests.post(f"{sim.optimove_url}/_sim/campaigns", json=conditional_spec(31, 8), timeout=5)
    result = cancel_campaign(listener, sim.optimove_url, 31, customers=["C00000001", "C00000004"],
                             timezone="Europe/Berlin")
    assert result["cancelled"] == 2 and result["available_until"] - result["cancelled_at"] == 7200
    assert result["notification"]["EventTypeID"] == 4 and result["notification"]["CampaignID"] == 31
    rows = requests.get(f"{sim.optimove_url}/customers/GetCanceledCampaignCustomers", params={"CampaignID": 31},
                        headers={"X-API-KEY": API_KEY}, timeout=5).json()
    assert [row["CustomerID"] for row in rows] == ["C00000001", "C00000004"]
    assert cancel_campaign(listener, sim.optimove_url, 31)["cancelled"] == 8
    assert cancel_campaign(listener, sim.optimove_url, 31, customers=0.5)["cancelled"] < 8
    with pytest.raises(DriverError, match="404"):
        cancel_campaign(listener, sim.optimove_url, 32)
    deadline = time.monotonic() + 5
    while len(relay.notifications) < 3 and time.monotonic() < deadline:
        time.sleep(0.02)
    assert [body["EventTypeID"] for body in relay.notifications] == [4, 4, 4]


def test_driver_refuses_a_listener_error_and_a_used_campaign(world):
    sim, make_relay = world
    _, listener = make_relay()
    with pytest.raises(DriverError, match="401"):
        run_conditional(listener.replace(TOKEN, "wrong"), sim.optimove_url, sim.bonus_admin_url, customers=3)
    requests.post(sim.bonus_url, json={"grants": [{"idempotency_key": "x", "campaign_id": 77, "customer_id": "C",
                                                    "promo_code": "WB23"}]}, timeout=5)
    with pytest.raises(DriverError, match="already holds grants"):
        run_conditional(listener, sim.optimove_url, sim.bonus_admin_url, customers=3, campaign_id=77)
    with pytest.raises(ValueError, match="timezone"):
        run_conditional(listener, sim.optimove_url, sim.bonus_admin_url, customers=3, timezone="Mars/Base")


def test_optimove_time_in_a_time_zone():
    epoch = datetime(2026, 7, 1, 10, 0, 5, 700000, tzinfo=timezone.utc).timestamp()
    assert optimove_time(epoch) == ("2026-07-01 10:00:05", epoch - 0.7)
    text, instant = optimove_time(epoch, "Europe/Berlin")
    assert text == "2026-07-01 12:00:05" and instant == pytest.approx(epoch - 0.7)


def test_cli_conditional_reads_up_json(world, tmp_path):
    sim, make_relay = world
    _, listener = make_relay()
    (tmp_path / "up.json").write_text(json.dumps({
        "listener_url": listener, "url": "http://unused", "admin_user": "a", "admin_password": "b",
        "simulator": sim.urls()}))
    result = CliRunner().invoke(simulate, ["conditional", "--data-dir", str(tmp_path), "--customers", "15",
                                           "--deadline-in", "20", "--reject-every", "5", "--timeout", "1", "--json"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.output)
    assert summary["ok"] and summary["expected_false"] == 3 and summary["approved_before_deadline"] == 12
    text = CliRunner().invoke(simulate, ["conditional", "--data-dir", str(tmp_path), "--customers", "5",
                                         "--deadline-in", "20"])
    assert text.exit_code == 0 and "Conditional campaign" in text.output and "OK" in text.output
    zone = CliRunner().invoke(simulate, ["conditional", "--data-dir", str(tmp_path), "--timezone", "Mars/Base"])
    assert zone.exit_code == 1 and "timezone" in zone.output
    missing = CliRunner().invoke(simulate, ["conditional", "--data-dir", str(tmp_path / "none")])
    assert missing.exit_code == 1 and "relay up" in missing.output
