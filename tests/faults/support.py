"""Helpers for the fault tests: create a campaign in the fake Optimove, fire it, wait, check exact counts."""
from __future__ import annotations

import json
import random
import time
from dataclasses import dataclass

import requests

from shared.optimove.rows import parse_execution_row
from simulator.campaigns import channel_rows, expected_sends, validate_spec
from simulator.driver import notification_bodies
from simulator.send_driver import _check as check_sends, send_spec
from cli.embedded import free_port, wait_for_port
from tests.conftest import poll
from tests.harness import Processes, post_notification

API_KEY = "sim-api-key-0123456789"
PAGES_FUNCTION = "GetCustomerExecutionDetailsByCampaign"


@dataclass
class Campaign:
    """A campaign created in the fake Optimove and everything the relay should make of it."""

    spec: dict
    triples: set[tuple[int, str, str]]
    pairs: int
    customers: dict[int, int]

    @property
    def id(self) -> int:
        return self.spec["campaign_id"]

    @property
    def channels(self) -> list[int]:
        return self.spec["channels"]

    def pages(self, page_size: int) -> int:
        """Page requests a clean run makes: full pages plus the short (or empty) last one, per channel."""
        return sum(n // page_size + 1 for n in self.customers.values())


def create_campaign(sim, campaign_id: int, channels=(504, 505, 506), customers_per_channel: int = 1000,
                    overlap: float = 0.5, codes=("WB23", "NV10"), multi_code_every: int = 2) -> Campaign:
    """Register a campaign in the fake Optimove; compute its expected triples by brute force."""
    spec = validate_spec({"campaign_id": campaign_id, "channels": list(channels),
                          "customers_per_channel": customers_per_channel, "overlap": overlap,
                          "codes": list(codes), "multi_code_every": multi_code_every})
    response = requests.post(f"{sim.optimove_url}/_sim/campaigns", json=spec, timeout=10)
    assert response.status_code == 200, response.text
    created = response.json()
    triples, pairs = set(), 0
    for channel in spec["channels"]:
        for row in channel_rows(spec, channel, 0, 10 ** 9):
            parsed = parse_execution_row(row)
            pairs += len(parsed.promo_codes)
            triples.update((campaign_id, parsed.customer_id, code) for code in parsed.promo_codes)
    assert created["expected_triples"] == len(triples)
    return Campaign(spec, triples, pairs, {int(ch): n for ch, n in created["customers_per_channel"].items()})


def start_web(procs: Processes, env: dict[str, str]) -> str:
    """`procs.web`, but a slow first /readyz on a loaded machine is retried rather than fatal."""
    port = free_port()
    proc = procs.start("web", ["web", "--port", str(port), "--workers", "2", "--threads", "4"], env)
    wait_for_port(port, 30, proc)
    base = f"http://127.0.0.1:{port}"

    def ready():
        try:
            return requests.get(base + "/readyz", timeout=5).status_code == 200
        except requests.RequestException:
            return False

    poll(ready, 45, 0.1, "web ready")
    return base


def fire(base: str, campaign: Campaign, seed: int = 7) -> None:
    """Deliver the EventTypeID 13 notifications as Optimove would: shuffled, one of them twice."""
    for body in notification_bodies(campaign.id, campaign.channels, random.Random(seed)):
        response = post_notification(base, body)
        assert response.status_code in (200, 202), (response.status_code, response.text)


def runs(db, campaign_id: int) -> list[dict]:
    """The campaign's runs as dicts."""
    with db.cursor() as cur:
        cur.execute("""SELECT id, channel_id, status, fetch_done, fetched, claimed, duplicates_skipped,
                              granted, rejected, failed, last_error
                       FROM campaign_runs WHERE campaign_id = %s ORDER BY channel_id""", (campaign_id,))
        names = [c.name for c in cur.description]
        return [dict(zip(names, row)) for row in cur.fetchall()]


def grant_statuses(db, campaign_id: int) -> dict[str, int]:
    """Ledger rows of the campaign by status."""
    with db.cursor() as cur:
        cur.execute("SELECT status, count(*) FROM grants WHERE campaign_id = %s GROUP BY status", (campaign_id,))
        return dict(cur.fetchall())


def wait_done(db, campaign: Campaign, timeout: float) -> list[dict]:
    """Poll Postgres until every channel's run is `done`; fail at once if a run or grant failed."""
    def finished():
        current = runs(db, campaign.id)
        failed = [r for r in current if r["status"] == "failed"]
        assert not failed, f"run(s) failed: {failed}"
        bad = grant_statuses(db, campaign.id).get("failed", 0)
        assert not bad, f"{bad} grant(s) failed"
        done = len(current) == len(campaign.channels) and all(r["status"] == "done" for r in current)
        return current if done else None

    return poll(finished, timeout, 0.1, f"campaign {campaign.id} done")


def ledger(sim, full: bool = False) -> dict:
    """The fake bonus system's ledger summary."""
    return requests.get(f"{sim.bonus_admin_url}/_sim/ledger", params={"full": int(full)}, timeout=10).json()


def optimove_stats(sim) -> dict:
    """The fake Optimove's request statistics."""
    return requests.get(f"{sim.optimove_url}/_sim/stats", timeout=10).json()


def assert_exact(db, sim, campaign: Campaign, record=None, recovery_s: float | None = None) -> dict:
    """Every expected triple granted exactly once at the bonus system, and Postgres agrees to the unit.
    With `record` (pytest's `record_property`), the measured lost/duplicate counts and `recovery_s` go to
    the faults report first."""
    if record is not None:
        record_figures(record, *measured_bonus(sim, campaign), recovery_s)
    summary = ledger(sim, full=True)
    applied = {(int(c), str(cu), str(p)) for c, cu, p in summary["triples"] if int(c) == campaign.id}
    expected = len(campaign.triples)
    assert summary["duplicate_grants"] == 0, summary
    assert summary["applied"] == expected, {k: v for k, v in summary.items() if k != "triples"}
    assert summary["rejected"] == 0
    assert applied == campaign.triples

    assert grant_statuses(db, campaign.id) == {"granted": expected}
    with db.cursor() as cur:
        cur.execute("SELECT customer_id, promo_code FROM grants WHERE campaign_id = %s", (campaign.id,))
        assert {(campaign.id, c, p) for c, p in cur.fetchall()} == campaign.triples
        cur.execute("SELECT status, count(*) FROM notifications WHERE campaign_id = %s GROUP BY 1", (campaign.id,))
        assert dict(cur.fetchall()) == {"done": len(campaign.channels)}

    current = runs(db, campaign.id)
    assert [r["channel_id"] for r in current] == sorted(campaign.channels)
    assert all(r["status"] == "done" and r["fetch_done"] for r in current), current
    assert {r["channel_id"]: r["fetched"] for r in current} == campaign.customers
    assert sum(r["claimed"] for r in current) == expected
    assert sum(r["granted"] for r in current) == expected
    assert sum(r["rejected"] + r["failed"] for r in current) == 0
    assert sum(r["claimed"] + r["duplicates_skipped"] for r in current) == campaign.pairs
    for r in current:
        assert r["granted"] == r["claimed"], r
    return {k: v for k, v in summary.items() if k != "triples"}


# -- send campaigns (flow 1: EventTypeID 13 on a send channel) ------------------------------

SEND_ATTRIBUTES = ("Email", "Country")
SEND_TEMPLATES = (14, 15, 16)


@dataclass
class SendCampaign:
    """A send campaign created in the fake Optimove and every send the relay must make of it."""

    spec: dict
    expected: dict  # (channel, customer) -> simulator.campaigns.ExpectedSend
    fired_at: float = 0.0
    notification_ids: tuple = ()

    @property
    def id(self) -> int:
        return self.spec["campaign_id"]

    @property
    def channels(self) -> list[int]:
        return self.spec["channels"]

    def due_by(self, when: float) -> int:
        """Expected sends due at or before `when` (epoch seconds)."""
        return sum(send.due.timestamp() <= when for send in self.expected.values())

    @property
    def last_due(self) -> float:
        return max(send.due.timestamp() for send in self.expected.values())


def send_channel_config(folder, channels, attributes=SEND_ATTRIBUTES) -> str:
    """A RELAY_CHANNEL_CONFIG file making `channels` send channels (events 13 and 11) asking for `attributes`."""
    path = folder / "channels.json"
    path.write_text(json.dumps({"default_role": "bonus", "channels": {
        str(channel): {"role": "send", "events": [13, 11], "attributes": list(attributes)} for channel in channels}}))
    return str(path)


def create_send_campaign(sim, campaign_id: int, channels=(610,), customers_per_channel: int = 1000,
                         start: float | None = None, spread: float = 30.0, due_now_fraction: float = 0.5,
                         overlap: float = 0.0, templates=SEND_TEMPLATES,
                         attributes=SEND_ATTRIBUTES) -> SendCampaign:
    """Register a send campaign whose clock started at `start` (epoch seconds, default now): a fraction is
    due then, the rest falls due evenly over `spread` seconds; compute the expected sends."""
    start = time.time() if start is None else start
    spec = validate_spec(send_spec(campaign_id, channels, customers_per_channel, start, spread, due_now_fraction,
                                   templates, "UTC", True, "mixed", overlap))
    response = requests.post(f"{sim.optimove_url}/_sim/campaigns", json=spec, timeout=10)
    assert response.status_code == 200, response.text
    expected = {send.key: send for send in expected_sends(spec, attributes)}
    assert response.json()["expected_sends"] == len(expected)
    return SendCampaign(spec, expected)


def fire_sends(base: str, campaign: SendCampaign, seed: int = 7) -> tuple[int, ...]:
    """Deliver the EventTypeID 13 notifications as Optimove would (shuffled, one twice); note when, and the
    notification ids the relay answered (one per channel)."""
    campaign.fired_at = time.time()
    ids = set()
    for body in notification_bodies(campaign.id, campaign.channels, random.Random(seed)):
        response = post_notification(base, body)
        assert response.status_code in (200, 202), (response.status_code, response.text)
        ids.add(response.json()["notification_id"])
    assert len(ids) == len(campaign.channels)
    campaign.notification_ids = tuple(sorted(ids))
    return campaign.notification_ids


def send_runs(db, campaign_id: int) -> list[dict]:
    """The send campaign's runs as dicts, by channel then id."""
    with db.cursor() as cur:
        cur.execute("""SELECT id, notification_id, channel_id, status, fetch_done, fetched, claimed,
                              duplicates_skipped, sent, rejected, failed, last_error
                       FROM campaign_runs WHERE campaign_id = %s ORDER BY channel_id, id""", (campaign_id,))
        names = [c.name for c in cur.description]
        return [dict(zip(names, row)) for row in cur.fetchall()]


def send_statuses(db, campaign_id: int) -> dict[str, int]:
    """Send ledger rows of the campaign by status."""
    with db.cursor() as cur:
        cur.execute("SELECT status, count(*) FROM sends WHERE campaign_id = %s GROUP BY status", (campaign_id,))
        return dict(cur.fetchall())


def wait_sends_done(db, campaign: SendCampaign, timeout: float, runs: int | None = None) -> list[dict]:
    """Poll Postgres until `runs` runs (default one per channel) of the campaign are `done`; fail at once if
    a run or a send failed or was rejected."""
    wanted = len(campaign.channels) if runs is None else runs

    def finished():
        current = send_runs(db, campaign.id)
        failed = [r for r in current if r["status"] == "failed"]
        assert not failed, f"run(s) failed: {failed}"
        statuses = send_statuses(db, campaign.id)
        bad = {s: n for s, n in statuses.items() if s in ("failed", "rejected")}
        assert not bad, f"send(s) parked: {bad}"
        done = len(current) == wanted and all(r["status"] == "done" for r in current)
        return current if done else None

    return poll(finished, timeout, 0.1, f"send campaign {campaign.id} done")


def send_ledger(sim, campaign_id: int | None = None) -> dict:
    """The fake send service's ledger summary (with one campaign's entries when `campaign_id` is given)."""
    params = {"full": 1, "campaign_id": campaign_id} if campaign_id is not None else {}
    return requests.get(f"{sim.send_admin_url}/_sim/ledger", params=params, timeout=30).json()


def assert_sends_exact(db, sim, campaign: SendCampaign, notifications: int | None = None, record=None,
                       recovery_s: float | None = None) -> dict:
    """Every expected send made exactly once at the fake send service, none before its time, with the
    expected template, attributes and scheduled_time; Postgres agrees to the unit. Returns the fake's
    counters plus the spec check (`late_seconds_future`, …). `record`: as in `assert_exact`."""
    if record is not None:
        record_figures(record, *measured_sends(sim, campaign), recovery_s)
    summary = send_ledger(sim, campaign.id)
    entries = summary.pop("entries")
    n = len(campaign.expected)
    checked = check_sends(entries, campaign.expected, campaign.fired_at)
    assert checked["missing"] == [], checked["missing"][:10]
    assert checked["sent"] == n and checked["duplicates"] == 0 and checked["early"] == 0, checked
    assert checked["rejected"] == 0 and checked["unexpected"] == 0, checked
    assert (checked["wrong_template"], checked["wrong_time"], checked["wrong_attributes"]) == (0, 0, 0), checked
    assert all(entry["applications"] == 1 and entry["early"] == 0 for entry in entries)
    assert len(entries) == n
    # the fake serves only this campaign in a test: its whole-ledger counters must agree
    assert summary["duplicate_sends"] == 0 and summary["early"] == 0, summary
    assert summary["applied"] == summary["unique_keys"] == n and summary["rejected"] == 0, summary

    assert send_statuses(db, campaign.id) == {"sent": n}
    with db.cursor() as cur:
        cur.execute("SELECT count(*) FROM sends WHERE campaign_id = %s AND updated_at < scheduled_time",
                    (campaign.id,))
        assert cur.fetchone()[0] == 0, "a send was settled before its scheduled_time"
        cur.execute("SELECT channel_id, customer_id, template_id, reference IS NOT NULL FROM sends "
                    "WHERE campaign_id = %s", (campaign.id,))
        rows = cur.fetchall()
        assert {(ch, cu): t for ch, cu, t, _ in rows} == {k: s.template_id for k, s in campaign.expected.items()}
        assert all(has_reference for *_, has_reference in rows)
        cur.execute("SELECT status, count(*) FROM notifications WHERE campaign_id = %s GROUP BY 1", (campaign.id,))
        assert dict(cur.fetchall()) == {"done": notifications or len(campaign.channels)}
        cur.execute("SELECT sum(attempts), max(attempts) FROM sends WHERE campaign_id = %s", (campaign.id,))
        attempts, max_attempts = cur.fetchone()

    current = send_runs(db, campaign.id)
    per_channel = {channel: 0 for channel in campaign.channels}
    for r in current:
        assert r["status"] == "done" and r["fetch_done"], r
        assert r["fetched"] == campaign.spec["customers_per_channel"], r
        assert r["sent"] == r["claimed"] and r["rejected"] == r["failed"] == 0, r
        assert r["claimed"] + r["duplicates_skipped"] == r["fetched"], r
        per_channel[r["channel_id"]] += r["sent"]
    assert per_channel == {channel: campaign.spec["customers_per_channel"] for channel in campaign.channels}
    assert sum(r["sent"] for r in current) == n
    return {**summary, "late_seconds": checked["late_seconds"], "late_seconds_future": checked["late_seconds_future"],
            "retries": int(attempts) - n, "max_attempts": int(max_attempts)}


# -- figures for bench/faults.md (`make faults-report`) -------------------------------------

def measured_bonus(sim, campaign: Campaign) -> tuple[int, int]:
    """(lost, duplicates) of a bonus campaign at the fake bonus system: expected triples never applied, and
    grants applied more than once."""
    summary = ledger(sim, full=True)
    applied = {(int(c), str(cu), str(p)) for c, cu, p in summary["triples"] if int(c) == campaign.id}
    return len(campaign.triples - applied), int(summary["duplicate_grants"])


def measured_sends(sim, campaign: SendCampaign) -> tuple[int, int]:
    """(lost, duplicates) of a send campaign at the fake send service."""
    entries = send_ledger(sim, campaign.id)["entries"]
    checked = check_sends(entries, campaign.expected, campaign.fired_at)
    return len(checked["missing"]), int(checked["duplicates"])


def record_figures(record_property, lost: int, duplicates: int, recovery_s: float | None = None, **figures) -> None:
    """Record what the report tabulates (`pytest`'s `record_property`): measured before the invariants are
    asserted, so a failing run shows the counts it found."""
    record_property("lost", int(lost))
    record_property("duplicates", int(duplicates))
    if recovery_s is not None:
        record_property("recovery_s", round(float(recovery_s), 1))
    for key, value in figures.items():
        record_property(key, value)


def own_postgres(tmp_path):
    """A test's own embedded Postgres, migrated: (server, URL, autocommit connection); the caller stops it."""
    from cli.embedded import EmbeddedPostgres
    from shared.db import upgrade

    pg = EmbeddedPostgres(tmp_path / "pg")
    url = pg.start()
    upgrade(url)
    return pg, url, _connect(url)


def _connect(url: str):
    import psycopg2

    db = psycopg2.connect(url)
    db.autocommit = True
    return db


def restart_postgres(pg, db):
    """`pg_ctl restart -m fast` of a test's own embedded Postgres (`own_postgres`; open connections are
    ended): close the test's connection `db`, restart, and return (a new autocommit connection, the
    monotonic time the server was back)."""
    import subprocess

    db.close()
    # -l: the restarted server must not inherit (and hold open) this call's output pipes
    result = subprocess.run([str(pg.bin / "pg_ctl"), "-D", str(pg.pgdata), "-l", str(pg.pgdata / "server.log"),
                             "-m", "fast", "-w", "restart",
                             "-o", f"-h 127.0.0.1 -p {pg.port} -c unix_socket_directories=''"],
                            stdin=subprocess.DEVNULL, capture_output=True, text=True, user=pg.run_as, timeout=120)
    assert result.returncode == 0, result.stderr
    restarted = time.monotonic()
    return _connect(pg.url), restarted
