"""`/admin` in headless Chromium: real web, worker and beat processes with the simulator run a finished
3-channel bonus campaign (flow 3) and a conditional run (flow 4); the page is rendered, checked and saved
as a full-page screenshot under `RELAY_TEST_ARTIFACTS` (default `tests/artifacts/`).

Chromium is Debian's `chromium` package (`.ci/run` installs it when missing). Without it the test is
skipped on a workstation and fails in CI (`CI` set), so CI never passes without the page being rendered.
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
import requests

from simulator.conditional_driver import run_conditional
from simulator.driver import run_campaign
from tests.conftest import ADMIN_PASSWORD, ROOT, TOKEN, poll
from tests.harness import campaign_status, relay_env

pytestmark = pytest.mark.e2e

CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
BONUS_CAMPAIGN, CONDITIONAL_CAMPAIGN = 616161, 626262
CHANNELS = (504, 505, 506)


def artifacts_dir() -> Path:
    """Where test artifacts go: `RELAY_TEST_ARTIFACTS`, else `tests/artifacts/` (gitignored)."""
    path = Path(os.environ.get("RELAY_TEST_ARTIFACTS") or ROOT / "tests" / "artifacts")
    path.mkdir(parents=True, exist_ok=True)
    return path


@pytest.fixture
def chromium() -> str:
    """Path of the Chromium binary; skip without it (or without playwright), except in CI, where that fails."""
    def missing(reason: str):
        if os.environ.get("CI"):
            pytest.fail(f"{reason}; CI must render /admin (.ci/run installs Debian's chromium before `make test`)")
        pytest.skip(f"{reason} (CI fails here instead)")

    path = shutil.which("chromium") or ("/usr/bin/chromium" if os.access("/usr/bin/chromium", os.X_OK) else None)
    if path is None:
        missing("chromium is not installed (Debian: apt-get install chromium)")
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        missing("playwright is not installed (it is in the test extras: pip install -e '.[test]')")
    return path


def table(page, selector: str) -> list[dict[str, str]]:
    """The rows of a rendered table as {header: cell text} (the error rows under runs are left out)."""
    headers = [h.strip().lower() for h in page.locator(f"{selector} thead th").all_inner_texts()]
    rows = []
    for row in page.locator(f"{selector} tbody tr:not(.err-row)").all():
        cells = [c.strip() for c in row.locator("td").all_inner_texts()]
        rows.append(dict(zip(headers, cells)))
    return rows


def test_admin_page_shows_a_finished_three_channel_campaign_and_a_conditional_run(
        procs, simulator, database_url, redis_url, db, tmp_path, chromium):
    from playwright.sync_api import Error as PlaywrightError, sync_playwright

    # a relay limit below Optimove's (50/10 s) so the page has rate-limit waits to show
    env = relay_env(database_url, redis_url, OPTIMOVE_API_URL=simulator.optimove_url,
                    OPTIMOVE_API_KEY="sim-api-key-0123456789", OPTIMOVE_RATE_LIMIT="6/3s", OPTIMOVE_PAGE_SIZE=500,
                    BONUS_URL=simulator.bonus_url, BONUS_REVOKE_URL=simulator.bonus_revoke_url, BONUS_BATCH_SIZE=500,
                    RELAY_RELEASE_INTERVAL=1)
    base = procs.web(env)
    procs.worker(env, concurrency=2)
    procs.start("beat", ["beat", "--schedule-file", str(tmp_path / "beat-schedule")], env)
    listener = f"{base}/optimove/events?token={TOKEN}"

    bonus = run_campaign(listener, simulator.optimove_url, simulator.bonus_admin_url,
                         f"{base}/api/campaigns/{{campaign_id}}", ("admin", ADMIN_PASSWORD), channels=CHANNELS,
                         customers_per_channel=1500, overlap=0.5, multi_code_every=2, campaign_id=BONUS_CAMPAIGN,
                         timeout=120)
    assert bonus["ok"], bonus
    conditional = run_conditional(listener, simulator.optimove_url, simulator.bonus_admin_url, customers=1000,
                                  deadline_in=60, reject_every=10, campaign_id=CONDITIONAL_CAMPAIGN, timeout=10)
    assert conditional["ok"], conditional
    poll(lambda: campaign_status(base, CONDITIONAL_CAMPAIGN)["status"] == "done", 30, 0.2,
         message="the conditional run done")
    truth = {r["channel_id"]: r for r in campaign_status(base, BONUS_CAMPAIGN)["runs"]}
    assert sorted(truth) == list(CHANNELS) and all(r["status"] == "done" for r in truth.values())
    flow4 = campaign_status(base, CONDITIONAL_CAMPAIGN)["runs"][0]
    waits = requests.get(f"{base}/api/overview", auth=("admin", ADMIN_PASSWORD), timeout=10).json()["rate_limit"]

    screenshot = artifacts_dir() / "admin-overview.png"
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, headless=True, args=CHROMIUM_ARGS)
        try:
            # no credentials: Chromium sees the 401 challenge and, with nobody to ask, refuses to navigate
            anonymous = browser.new_context()
            page = anonymous.new_page()
            seen = []
            page.on("response", lambda r: seen.append((r.status, r.headers.get("www-authenticate", ""))))
            with pytest.raises(PlaywrightError, match="ERR_INVALID_AUTH_CREDENTIALS"):
                page.goto(f"{base}/admin")
            assert seen and all(status == 401 and challenge.startswith("Basic") for status, challenge in seen), seen
            anonymous.close()
            # a wrong password: the 401 page, holding no data
            wrong = browser.new_context(http_credentials={"username": "admin", "password": "wrong"})
            answer = wrong.new_page().goto(f"{base}/admin")
            assert answer is not None and answer.status == 401 and str(BONUS_CAMPAIGN) not in answer.text()
            wrong.close()

            admin = browser.new_context(http_credentials={"username": "admin", "password": ADMIN_PASSWORD},
                                        viewport={"width": 1440, "height": 900})
            page = admin.new_page()
            answer = page.goto(f"{base}/admin")
            assert answer is not None and answer.status == 200
            page.screenshot(path=str(screenshot), full_page=True)

            runs = {row["run"]: row for row in table(page, "#runs table")}
            for channel, run in truth.items():
                row = runs[f"#{run['run_id']}"]
                assert (row["campaign"], row["flow"], row["channel"], row["status"]) == \
                    (str(BONUS_CAMPAIGN), "scheduled_bonus", str(channel), "done"), row
                assert row["progress"] == "100%"
                assert row["fetched"] == f"{run['fetched']:,}" and run["fetched"] == 1500
                assert row["granted / sent"] == f"{run['granted']:,} granted" and run["granted"] > 0
                assert row["dups skipped"] == f"{run['duplicates_skipped']:,}"
                assert (row["rejected"], row["failed"], row["waiting"]) == ("0", "0", "0")
            assert sum(r["granted"] for r in truth.values()) == bonus["expected_triples"]
            assert sum(r["duplicates_skipped"] for r in truth.values()) > 0  # the channels overlap

            [row] = [r for r in table(page, "#conditional table") if r["campaign"] == str(CONDITIONAL_CAMPAIGN)]
            assert (row["run"], row["status"], row["progress"]) == (f"#{flow4['run_id']}", "done", "100%")
            assert row["deadline (utc)"] and row["time left"].startswith("finished") and "before it" in row["time left"]
            assert row["rep. true"] == f"{flow4['reported_true']:,}" and flow4["reported_true"] == 900
            assert row["rep. false"] == f"{flow4['reported_false']:,}" and flow4["reported_false"] == 100
            assert row["unreported"] == "0"

            rate = page.locator("#rate-limit").inner_text()
            assert "6 requests per 3 s" in rate
            assert waits["count"] > 0 and f"{waits['count']:,} waits" in rate
            notifications = table(page, "#notifications table")
            assert sum(1 for n in notifications if n["campaign"] == str(BONUS_CAMPAIGN)) == 3
            assert any(n["event"] == "5" and n["status"] == "done" for n in notifications)

            answer = page.goto(f"{base}/admin/campaigns/{BONUS_CAMPAIGN}?ledger=grants&status=granted&limit=20")
            assert answer is not None and answer.status == 200
            page.screenshot(path=str(artifacts_dir() / "admin-campaign.png"), full_page=True)
            assert f"granted · {bonus['expected_triples']:,}" in page.locator("#ledger .chips").last.inner_text()
            ledger = table(page, "#ledger table")
            assert len(ledger) == 20 and all(row["status"] == "granted" for row in ledger)
        finally:
            browser.close()
    assert screenshot.stat().st_size > 20_000 and screenshot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    print(f"screenshot: {screenshot}")
