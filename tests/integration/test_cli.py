"""The operator commands against a real database."""
from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from cli.main import main
from shared import repository as repo
from shared.db import make_engine, unit_of_work
from shared.flows.grants import GRANTS
from shared.flows.ledger import Scope
from shared.schemas import parse_notification

pytestmark = pytest.mark.integration


@pytest.fixture
def campaign(database_url, db):
    engine = make_engine(database_url)
    with unit_of_work(engine) as conn:
        for channel in (504, 505):
            nid, _ = repo.insert_notification(
                conn, parse_notification({"EventTypeID": 13, "CampaignID": 77, "ChannelID": channel}), "{}")
            run_id, _ = repo.create_run(conn, nid, "scheduled_bonus", 77, channel)
            ids = GRANTS.claim(conn, Scope(77, channel, "scheduled_bonus", run_id=run_id),
                               [("C1", "WB23"), (f"C{channel}", "WB23")])
            repo.advance_run(conn, run_id, rows=2, claimed=len(ids), duplicates=2 - len(ids), fetch_done=True)
            repo.settle(conn, repo.GRANTS, run_id, done=[(i, "ref") for i in ids], rejected=[], retry=[],
                        max_attempts=3)
            repo.finish_run_if_complete(conn, run_id)
    engine.dispose()
    return 77


def test_campaigns_show_table_and_json(campaign, database_url, monkeypatch):
    monkeypatch.setenv("DATABASE_URL", database_url)
    result = CliRunner().invoke(main, ["campaigns", "show", str(campaign)])
    assert result.exit_code == 0, result.output
    assert "campaign 77: done" in result.output
    assert "totals: fetched 4, claimed 3, skipped as already in the ledger 1, granted 3" in result.output
    data = json.loads(CliRunner().invoke(main, ["campaigns", "show", str(campaign), "--json"]).output)
    assert [r["channel_id"] for r in data["runs"]] == [504, 505]
    assert data["totals"]["duplicates_skipped"] == 1 and data["ledger"] == {"granted": 3}


def test_unknown_campaign_says_so(database_url, db, monkeypatch):
    monkeypatch.setenv("DATABASE_URL", database_url)
    result = CliRunner().invoke(main, ["campaigns", "show", "999"])
    assert result.exit_code == 0 and "campaign 999: unknown" in result.output


def test_simulator_attached_only_without_optimove_credentials(tmp_path):
    from cli.supervisor import Supervisor
    from shared.settings import Settings

    bare = Settings.from_env({})
    real = Settings.from_env({"OPTIMOVE_API_URL": "https://api5.optimove.net/current", "OPTIMOVE_API_KEY": "k" * 20})
    assert Supervisor(bare, tmp_path, 8000, 5555, 1, None).attach_simulator is True
    assert Supervisor(real, tmp_path, 8000, 5555, 1, None).attach_simulator is False
    assert Supervisor(real, tmp_path, 8000, 5555, 1, True).attach_simulator is True
