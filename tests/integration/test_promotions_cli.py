"""`relay promotions` as a real process against the fake Optimove over HTTP (no database involved)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from simulator.server import start
from tests.integration.test_templates_cli import KEY, calls, relay, relay_env


@pytest.fixture
def sim():
    running = start(api_key=KEY)
    yield running
    running.stop()


def write_csv(path: Path, n: int) -> Path:
    path.write_text("PromoCode,PromotionName\n" + "".join(f"P{i:03},Promotion {i}\n" for i in range(1, n + 1)))
    return path


def test_250_promotions_go_in_three_calls_and_list_shows_them(sim, tmp_path):
    env = relay_env(sim.optimove_url, DATABASE_URL="postgresql://nobody@127.0.0.1:1/none")  # never connected
    result = relay("promotions", "sync", "--file", write_csv(tmp_path / "promos.csv", 250), env=env)
    assert result.returncode == 0, result.stderr
    assert result.stdout == "synced 250 promotions to Optimove in 3 call(s) (AddPromotions)\n"
    assert result.stderr.splitlines() == ["sent 100/250 promotions (call 1 of 3)",
                                          "sent 200/250 promotions (call 2 of 3)",
                                          "sent 250/250 promotions (call 3 of 3)"]
    assert calls(sim) == {"AddPromotions": 3}

    listed = relay("promotions", "list", env=env)
    assert listed.returncode == 0, listed.stderr
    lines = listed.stdout.splitlines()
    assert lines[0] == "PromoCode  PromotionName" and lines[1] == "P001       Promotion 1"
    assert len(lines) == 1 + 250 + 1 and lines[-1] == "250 promotions on Optimove"
    as_json = json.loads(relay("promotions", "list", "--json", env=env).stdout)
    assert len(as_json) == 250 and as_json[-1] == {"PromoCode": "P250", "PromotionName": "Promotion 250"}


def test_json_file_dry_run_and_resync_overwrites_names(sim, tmp_path):
    path = tmp_path / "promos.json"
    path.write_text(json.dumps({"promotions": [{"code": "WB23", "name": "Welcome back"},
                                              {"PromoCode": "NV10", "PromotionName": "New VIP 10%"}]}, indent=2))
    env = relay_env(sim.optimove_url)
    dry = relay("promotions", "sync", "--file", path, "--dry-run", env=env)
    assert dry.returncode == 0, dry.stderr
    assert dry.stdout.splitlines() == [
        "dry run: 2 promotions would be sent in 1 call(s) of at most 100: POST /integrations/AddPromotions",
        "  call 1 of 1: 2 promotions (PromoCode WB23 … NV10, file lines 3-7)",
        "nothing was sent"]
    assert calls(sim) == {}
    assert relay("promotions", "sync", "--file", path, env=env).returncode == 0
    path.write_text(json.dumps([{"PromoCode": "WB23", "PromotionName": "Welcome back v2"}]))
    assert relay("promotions", "sync", "--file", path, env=env).returncode == 0
    listed = json.loads(relay("promotions", "list", "--json", env=env).stdout)
    assert listed == [{"PromoCode": "WB23", "PromotionName": "Welcome back v2"},
                      {"PromoCode": "NV10", "PromotionName": "New VIP 10%"}]


def test_a_file_with_bad_lines_sends_nothing_and_names_each_line(sim, tmp_path):
    env = relay_env(sim.optimove_url)
    bad = write_csv(tmp_path / "bad.csv", 150)
    bad.write_text(bad.read_text() + ",No code\nP007,Duplicate\nP151,\nP152\n")
    result = relay("promotions", "sync", "--file", bad, env=env)
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr.splitlines() == [
        f"{bad} line 152: PromoCode is empty",
        f'{bad} line 153: duplicate PromoCode "P007" (first on line 8)',
        f"{bad} line 154: PromotionName is empty",
        f"{bad} line 155: missing PromotionName (the row has 1 of the header's 2 columns)",
        f"relay: {bad}: 4 problem(s); nothing was sent",
    ]
    bad_json = tmp_path / "bad.json"
    bad_json.write_text('[\n {"PromoCode": "A", "PromotionName": "A"},\n {"PromoCode": 5.5, "PromotionName": "B"},\n'
                        ' {"PromotionName": "C"}\n]\n')
    result = relay("promotions", "sync", "--file", bad_json, env=env)
    assert result.returncode == 2
    assert result.stderr.splitlines() == [
        f"{bad_json} line 3, item [1]: PromoCode 5.5 is not a string",
        f"{bad_json} line 4, item [2]: missing PromoCode",
        f"relay: {bad_json}: 2 problem(s); nothing was sent"]
    assert calls(sim) == {}


def test_delete_removes_the_named_codes(sim, tmp_path):
    env = relay_env(sim.optimove_url)
    assert relay("promotions", "sync", "--file", write_csv(tmp_path / "p.csv", 5), env=env).returncode == 0
    result = relay("promotions", "delete", "P002", "P004", "P004", "NOPE", env=env)
    assert result.returncode == 0, result.stderr
    assert result.stdout == "deleted 3 promotions from Optimove in 1 call(s) (DeletePromotions): P002, P004, NOPE\n"
    listed = json.loads(relay("promotions", "list", "--json", env=env).stdout)
    assert [p["PromoCode"] for p in listed] == ["P001", "P003", "P005"]
    assert calls(sim)["DeletePromotions"] == 1


def test_delete_in_batches_of_100(sim, tmp_path):
    env = relay_env(sim.optimove_url)
    assert relay("promotions", "sync", "--file", write_csv(tmp_path / "p.csv", 250), env=env).returncode == 0
    result = relay("promotions", "delete", *(f"P{i:03}" for i in range(1, 206)), env=env)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("deleted 205 promotions from Optimove in 3 call(s) (DeletePromotions)")
    assert calls(sim)["DeletePromotions"] == 3
    assert len(json.loads(relay("promotions", "list", "--json", env=env).stdout)) == 45


def test_missing_settings_and_wrong_key(sim, tmp_path):
    for args in (("sync", "--file", write_csv(tmp_path / "p.csv", 3)), ("list",), ("delete", "P001")):
        result = relay("promotions", *args, env=relay_env(None, None))
        assert result.returncode == 2 and "OPTIMOVE_API_URL" in result.stderr and "Traceback" not in result.stderr
    result = relay("promotions", "delete", "P001", env=relay_env(sim.optimove_url, "wrong-" + KEY[::-1]))
    assert result.returncode == 1
    assert result.stderr == ('relay: DeletePromotions call 1 of 1 failed: POST DeletePromotions: HTTP 401: '
                             '"Unauthorized"; 0 promotions were deleted before it\n')
