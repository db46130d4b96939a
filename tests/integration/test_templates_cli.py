"""`relay templates` as a real process against the fake Optimove over HTTP (no database involved)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import uuid
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import pytest
import requests

from simulator.server import start
from tests.conftest import ROOT
from tests.stub_server import StubServer

KEY = "templates-cli-SECRET-key-0123"
RELAY = Path(sys.executable).with_name("relay")


@pytest.fixture
def sim():
    running = start(api_key=KEY)
    yield running
    running.stop()


def relay_env(url: str | None, key: str | None = KEY, **extra: str) -> dict[str, str]:
    """The environment of the command: only the given Optimove settings, no database, no Redis."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("RELAY_", "OPTIMOVE_", "BONUS_", "SEND_", "DATABASE_URL", "REDIS_URL"))}
    env.update({"PYTHONPATH": str(ROOT), **extra})
    if url:
        env["OPTIMOVE_API_URL"] = url
    if key:
        env["OPTIMOVE_API_KEY"] = key
    return env


def relay_command() -> list[str]:
    """The installed `relay` script next to this Python, or the module."""
    return [str(RELAY)] if RELAY.exists() else [sys.executable, "-m", "cli.main"]


def relay(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    """Run `relay ARGS`; the API key must appear in none of its output."""
    result = subprocess.run([*relay_command(), *map(str, args)], env=env, cwd=ROOT, capture_output=True, text=True,
                            timeout=60)
    assert KEY not in result.stdout + result.stderr
    return result


def calls(sim) -> dict[str, int]:
    return requests.get(sim.optimove_url + "/_sim/stats", timeout=5).json()["requests_by_function"]


def write_csv(path: Path, n: int) -> Path:
    path.write_text("TemplateID,TemplateName\n" + "".join(f"{i},Template {i}\n" for i in range(1, n + 1)))
    return path


def test_250_templates_go_in_three_calls_and_list_shows_them(sim, tmp_path):
    env = relay_env(sim.optimove_url, DATABASE_URL="postgresql://nobody@127.0.0.1:1/none")  # never connected
    result = relay("templates", "sync", "--channel", 504, "--file", write_csv(tmp_path / "t.csv", 250), env=env)
    assert result.returncode == 0, result.stderr
    assert result.stdout == "synced 250 templates to channel 504 in 3 call(s) (AddChannelTemplates)\n"
    assert result.stderr.splitlines() == ["sent 100/250 templates (call 1 of 3)",
                                          "sent 200/250 templates (call 2 of 3)",
                                          "sent 250/250 templates (call 3 of 3)"]
    assert calls(sim) == {"AddChannelTemplates": 3}

    listed = relay("templates", "list", "--channel", 504, env=env)
    assert listed.returncode == 0, listed.stderr
    lines = listed.stdout.splitlines()
    assert lines[0] == "TemplateID  TemplateName" and lines[1] == "         1  Template 1"
    assert len(lines) == 1 + 250 + 1 and lines[-1] == "250 templates on channel 504"
    as_json = json.loads(relay("templates", "list", "--channel", 504, "--json", env=env).stdout)
    assert len(as_json) == 250 and as_json[-1] == {"TemplateID": 250, "TemplateName": "Template 250"}
    assert relay("templates", "list", "--channel", 505, env=env).stdout == "0 templates on channel 505\n"


def test_json_file_and_resync_upserts(sim, tmp_path):
    path = tmp_path / "t.json"
    path.write_text(json.dumps({"templates": [{"id": i, "name": f"v1 {i}"} for i in range(1, 4)]}, indent=2))
    env = relay_env(sim.optimove_url)
    assert relay("templates", "sync", "--channel", 7, "--file", path, env=env).returncode == 0
    path.write_text(json.dumps([{"TemplateID": 3, "TemplateName": "v2 3"}, {"TemplateID": 4, "TemplateName": "v2 4"}]))
    assert relay("templates", "sync", "--channel", 7, "--file", path, env=env).returncode == 0
    listed = json.loads(relay("templates", "list", "--channel", 7, "--json", env=env).stdout)
    assert [(t["TemplateID"], t["TemplateName"]) for t in listed] == [(1, "v1 1"), (2, "v1 2"), (3, "v2 3"),
                                                                      (4, "v2 4")]


def test_a_file_with_bad_lines_sends_nothing_and_names_each_line(sim, tmp_path):
    env = relay_env(sim.optimove_url)
    bad_csv = write_csv(tmp_path / "bad.csv", 150)
    bad_csv.write_text(bad_csv.read_text() + "abc,Bad id\n0,Zero\n7,Duplicate\n151,\n152\n")
    result = relay("templates", "sync", "--channel", 504, "--file", bad_csv, env=env)
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr.splitlines() == [
        f'{bad_csv} line 152: TemplateID "abc" is not an integer',
        f'{bad_csv} line 153: TemplateID "0" is not a positive integer',
        f"{bad_csv} line 154: duplicate TemplateID 7 (first on line 8)",
        f"{bad_csv} line 155: TemplateName is empty",
        f"{bad_csv} line 156: missing TemplateName (the row has 1 of the header's 2 columns)",
        f"relay: {bad_csv}: 5 problem(s); nothing was sent",
    ]
    bad_json = tmp_path / "bad.json"
    bad_json.write_text('[\n {"TemplateID": 1, "TemplateName": "A"},\n {"TemplateID": 1, "TemplateName": "B"},\n'
                        ' {"TemplateID": 2}\n]\n')
    result = relay("templates", "sync", "--channel", 504, "--file", bad_json, env=env)
    assert result.returncode == 2
    assert result.stderr.splitlines()[:2] == [
        f"{bad_json} line 3, item [1]: duplicate TemplateID 1 (first on line 2, item [0])",
        f"{bad_json} line 4, item [2]: missing TemplateName"]
    assert "AddChannelTemplates" not in calls(sim)


def test_dry_run_prints_the_plan_and_sends_nothing(sim, tmp_path):
    result = relay("templates", "sync", "--channel", 504, "--file", write_csv(tmp_path / "t.csv", 250), "--dry-run",
                   env=relay_env(sim.optimove_url))
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == [
        "dry run: 250 templates would be sent in 3 call(s) of at most 100: "
        "POST /integrations/AddChannelTemplates?ChannelID=504",
        "  call 1 of 3: 100 templates (TemplateID 1 … 100, file lines 2-101)",
        "  call 2 of 3: 100 templates (TemplateID 101 … 200, file lines 102-201)",
        "  call 3 of 3: 50 templates (TemplateID 201 … 250, file lines 202-251)",
        "nothing was sent",
    ]
    assert calls(sim) == {}


def test_missing_settings_name_the_variable(tmp_path):
    path = write_csv(tmp_path / "t.csv", 3)
    for env in (relay_env(None, None), relay_env(None, KEY)):
        for args in (("sync", "--channel", 504, "--file", path), ("list", "--channel", 504)):
            result = relay("templates", *args, env=env)
            assert result.returncode == 2 and "OPTIMOVE_API_URL" in result.stderr, result.stderr
            assert "Traceback" not in result.stderr


def test_wrong_key_is_a_clear_error_without_the_key(sim, tmp_path):
    result = relay("templates", "list", "--channel", 504, env=relay_env(sim.optimove_url, "wrong-" + KEY[::-1]))
    assert result.returncode == 1
    assert result.stderr == 'relay: GetChannelTemplates failed: GET GetChannelTemplates: HTTP 401: "Unauthorized"\n'


def test_a_failed_call_stops_and_says_how_many_were_sent(tmp_path):
    server = StubServer()
    answers = iter([(200, {}, b""), (400, {"Content-Type": "application/json"},
                                     json.dumps(f"Invalid template for key {KEY}").encode())])
    server.reply = lambda req: next(answers)
    try:
        result = relay("templates", "sync", "--channel", 504, "--file", write_csv(tmp_path / "t.csv", 250),
                       env=relay_env(server.url.rstrip("/")))
    finally:
        server.close()
    assert result.returncode == 1 and result.stdout == ""
    assert len(server.requests) == 2
    first = server.requests[0]
    assert first["path"] == "/integrations/AddChannelTemplates" and first["query"] == {"ChannelID": ["504"]}
    assert first["headers"]["x-api-key"] == KEY and len(json.loads(first["body"])) == 100
    assert result.stderr.splitlines() == [
        "sent 100/250 templates (call 1 of 3)",
        'relay: AddChannelTemplates call 2 of 3 failed: POST AddChannelTemplates: HTTP 400: '
        '"Invalid template for key ***"',
        "100 of 250 templates were sent before it, in 1 call(s). Running the same command again is safe: "
        "Optimove stores templates by TemplateID, so the batches already sent are simply sent again.",
    ]


@pytest.mark.integration
def test_with_redis_url_the_limit_is_shared_with_the_workers(tmp_path, redis_server):
    """A worker-style RateLimiter holding the whole budget of the key makes the command wait for it."""
    import redis

    from shared.optimove.limiter import RateLimiter
    from shared.settings import RateLimit, Secret

    key = f"shared-limit-{uuid.uuid4().hex}"
    # A db of our own: other test sessions flush the shared test db while this test waits on it.
    url = urlunsplit(urlsplit(redis_server)._replace(path="/13"))
    client = redis.Redis.from_url(url)
    sim = start(api_key=key)
    try:
        worker = RateLimiter(client, Secret(key), RateLimit(2, 3.0))
        assert worker.try_acquire() == 0.0 and worker.try_acquire() == 0.0
        path = write_csv(tmp_path / "t.csv", 3)
        began = time.monotonic()
        result = subprocess.run(
            [*relay_command(), "templates", "sync", "--channel", "504", "--file", str(path)],
            env=relay_env(sim.optimove_url, key, REDIS_URL=url, OPTIMOVE_RATE_LIMIT="2/3s"), cwd=ROOT,
            capture_output=True, text=True, timeout=60)
        waited = time.monotonic() - began
        assert result.returncode == 0, result.stderr
        assert waited >= 2.0, f"the command did not wait for the budget the worker holds ({waited:.2f}s)"
        # and its own call counts against the workers' budget: one slot of two is left
        assert worker.try_acquire() == 0.0 and worker.try_acquire() > 0
        assert calls(sim) == {"AddChannelTemplates": 1}
    finally:
        client.delete(worker.key)
        client.close()
        sim.stop()
    down = relay("templates", "sync", "--channel", 504, "--file", tmp_path / "t.csv",
                 env=relay_env("http://127.0.0.1:1", REDIS_URL="redis://127.0.0.1:1/0"))
    assert down.returncode == 1 and "REDIS_URL" in down.stderr
    assert "None of the 3 templates were sent" in down.stderr and "Traceback" not in down.stderr
