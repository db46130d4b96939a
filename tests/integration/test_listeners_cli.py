"""`relay listeners` as a real process against the fake Optimove over HTTP (no database, no Redis)."""
from __future__ import annotations

import json
import subprocess

import pytest
import requests

from simulator.server import start
from tests.conftest import ROOT
from tests.integration.test_templates_cli import relay_command, relay_env

KEY = "listeners-cli-SECRET-key-0123"
TOKEN = "listener-TOKEN-abcdef0123456789"
SECOND = "second-TOKEN-zyxwvu9876543210"
PUBLIC = "https://relay.example.com"
URL = f"{PUBLIC}/optimove/events?token={TOKEN}"
SHOWN = f"{PUBLIC}/optimove/events?token=***"
CONFIG = {"default_role": "bonus", "conditional": True,
          "channels": {"504": {"role": "bonus"}, "510": {"role": "send", "events": [13, 11]}}}
WANTED = [(4, None), (5, None), (13, 504), (11, 510), (13, 510)]


@pytest.fixture
def sim():
    running = start(api_key=KEY)
    yield running
    running.stop()


@pytest.fixture
def env(sim, tmp_path):
    path = tmp_path / "channels.json"
    path.write_text(json.dumps(CONFIG))
    return relay_env(sim.optimove_url, KEY, RELAY_PUBLIC_URL=PUBLIC, RELAY_LISTENER_TOKENS=f"{TOKEN},{SECOND}",
                     RELAY_CHANNEL_CONFIG=str(path))


def relay(*args, env, secrets_shown: bool = False) -> subprocess.CompletedProcess:
    """Run `relay ARGS`; the API key never appears, the tokens only with --show-secrets."""
    assert "DATABASE_URL" not in env and "REDIS_URL" not in env
    result = subprocess.run([*relay_command(), *map(str, args)], env=env, cwd=ROOT, capture_output=True, text=True,
                            timeout=60)
    output = result.stdout + result.stderr
    assert KEY not in output and "Traceback" not in output, output
    if not secrets_shown:
        assert TOKEN not in output and SECOND not in output, output
    return result


def stored(sim) -> dict[tuple, str]:
    rows = requests.get(sim.optimove_url + "/_sim/listeners", timeout=5).json()
    return {(r["EventTypeID"], r.get("ChannelID")): r["ListenerURL"] for r in rows}


def calls(sim) -> dict[str, int]:
    return requests.get(sim.optimove_url + "/_sim/stats", timeout=5).json()["requests_by_function"]


def register_directly(sim, **body) -> None:
    response = requests.post(sim.optimove_url + "/general/RegisterEventListener", json=body,
                             headers={"X-API-KEY": KEY}, timeout=5)
    assert response.status_code == 200


def test_first_run_registers_everything_second_run_nothing(sim, env):
    first = relay("listeners", "register", env=env)
    assert first.returncode == 0, first.stderr
    assert first.stdout.splitlines() == [
        f"ListenerURL: {SHOWN}",
        "  registered      EventTypeID 13 ChannelID 504",
        "  registered      EventTypeID 13 ChannelID 510",
        "  registered      EventTypeID 11 ChannelID 510",
        "  registered      EventTypeID 4 (no channel)",
        "  registered      EventTypeID 5 (no channel)",
        "registered 5 listeners, 0 already right, 0 not in the config left alone",
    ]
    assert stored(sim) == {key: URL for key in WANTED}
    assert calls(sim) == {"GetRegisteredEventListeners": 2, "RegisterEventListener": 5}

    second = relay("listeners", "register", env=env)
    assert second.returncode == 0, second.stderr
    assert second.stdout.splitlines()[-1] == "registered 0 listeners, 5 already right, 0 not in the config left alone"
    assert calls(sim) == {"GetRegisteredEventListeners": 3, "RegisterEventListener": 5}


def test_a_changed_public_url_re_registers_exactly_what_changed(sim, env):
    register_directly(sim, EventTypeID=13, ChannelID=504, ListenerURL=URL)
    register_directly(sim, EventTypeID=4, ListenerURL=URL)
    register_directly(sim, EventTypeID=13, ChannelID=510, ListenerURL=f"https://old.example.com/optimove/events"
                                                                       f"?token={SECOND}")
    register_directly(sim, EventTypeID=1, ListenerURL=URL)  # not in the config: left alone
    result = relay("listeners", "register", env=env)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == [
        f"ListenerURL: {SHOWN}",
        "  already right   EventTypeID 13 ChannelID 504",
        "  registered      EventTypeID 13 ChannelID 510, was https://old.example.com/optimove/events?token=***",
        "  registered      EventTypeID 11 ChannelID 510",
        "  already right   EventTypeID 4 (no channel)",
        "  registered      EventTypeID 5 (no channel)",
        f"  not in config   EventTypeID 1 (no channel): {SHOWN} (left alone)",
        "registered 3 listeners, 2 already right, 1 not in the config left alone",
    ]
    assert stored(sim) == {**{key: URL for key in WANTED}, (1, None): URL}

    moved = dict(env, RELAY_PUBLIC_URL="https://new.example.com/relay/")
    before = calls(sim)["RegisterEventListener"]
    result = relay("listeners", "register", env=moved)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[0] == "ListenerURL: https://new.example.com/relay/optimove/events?token=***"
    assert result.stdout.splitlines()[-1] == "registered 5 listeners, 0 already right, 1 not in the config left alone"
    assert calls(sim)["RegisterEventListener"] == before + 5
    new_url = f"https://new.example.com/relay/optimove/events?token={TOKEN}"
    assert stored(sim) == {**{key: new_url for key in WANTED}, (1, None): URL}


def test_dry_run_changes_nothing(sim, env):
    register_directly(sim, EventTypeID=4, ListenerURL=URL)
    register_directly(sim, EventTypeID=13, ChannelID=504, ListenerURL="https://old.example.com/x?token=" + SECOND)
    before = stored(sim)
    result = relay("listeners", "register", "--dry-run", env=env)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == [
        "dry run:",
        f"ListenerURL: {SHOWN}",
        "  to register     EventTypeID 13 ChannelID 504: registered with another URL "
        "https://old.example.com/x?token=***",
        "  to register     EventTypeID 13 ChannelID 510: not registered",
        "  to register     EventTypeID 11 ChannelID 510: not registered",
        "  already right   EventTypeID 4 (no channel)",
        "  to register     EventTypeID 5 (no channel): not registered",
        "dry run: 4 listeners would be registered, 1 already right, 0 not in the config left alone; "
        "nothing was changed",
    ]
    assert stored(sim) == before
    assert calls(sim) == {"RegisterEventListener": 2, "GetRegisteredEventListeners": 1}


def test_list_and_unregister_one(sim, env):
    assert relay("listeners", "register", env=env).returncode == 0
    listed = relay("listeners", "list", env=env)
    assert listed.returncode == 0, listed.stderr
    assert listed.stdout.splitlines() == [
        "EventTypeID  ChannelID  ListenerURL",
        f"          4          -  {SHOWN}",
        f"          5          -  {SHOWN}",
        f"         11        510  {SHOWN}",
        f"         13        504  {SHOWN}",
        f"         13        510  {SHOWN}",
        "5 listeners registered",
    ]
    as_json = json.loads(relay("listeners", "list", "--json", env=env).stdout)
    assert {(r["EventTypeID"], r.get("ChannelID")): r["ListenerURL"] for r in as_json} == \
        {key: SHOWN for key in WANTED}

    result = relay("listeners", "unregister", "--event", 13, "--channel", 510, env=env)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == [f"  unregistered    EventTypeID 13 ChannelID 510: {SHOWN}",
                                          "1 listener unregistered (EventTypeID 13 ChannelID 510)"]
    assert set(stored(sim)) == set(WANTED) - {(13, 510)}
    assert calls(sim)["UnregisterEventListener"] == 1

    again = relay("listeners", "unregister", "--event", 13, "--channel", 510, env=env)
    assert again.returncode == 0 and again.stdout == \
        "nothing registered for EventTypeID 13 ChannelID 510; 0 listeners unregistered\n"
    assert calls(sim)["UnregisterEventListener"] == 1

    back = relay("listeners", "register", env=env)
    assert back.stdout.splitlines()[-1] == "registered 1 listener, 4 already right, 0 not in the config left alone"
    assert set(stored(sim)) == set(WANTED)


def test_the_token_shows_only_with_show_secrets(sim, env):
    shown = relay("listeners", "register", "--dry-run", "--show-secrets", env=env, secrets_shown=True)
    assert f"ListenerURL: {URL}" in shown.stdout
    registered = relay("listeners", "register", "--show-secrets", env=env, secrets_shown=True)
    assert registered.returncode == 0 and URL in registered.stdout
    listed = relay("listeners", "list", "--show-secrets", env=env, secrets_shown=True)
    assert URL in listed.stdout
    assert URL in relay("listeners", "list", "--json", "--show-secrets", env=env, secrets_shown=True).stdout
    gone = relay("listeners", "unregister", "--event", 4, "--show-secrets", env=env, secrets_shown=True)
    assert URL in gone.stdout
    # and hidden without the flag (relay() asserts neither token appears anywhere)
    for args in (("register", "--dry-run"), ("register",), ("list",), ("list", "--json"),
                 ("unregister", "--event", 5)):
        assert relay("listeners", *args, env=env).returncode == 0


def test_errors_name_the_variable_and_hide_the_token(sim, env):
    for name in ("RELAY_PUBLIC_URL", "RELAY_LISTENER_TOKENS"):
        result = relay("listeners", "register", env={k: v for k, v in env.items() if k != name})
        assert result.returncode == 2 and name in result.stderr, result.stderr
    result = relay("listeners", "list", env={k: v for k, v in env.items() if not k.startswith("OPTIMOVE_")})
    assert result.returncode == 2 and "OPTIMOVE_API_URL" in result.stderr
    assert calls(sim) == {}
    # Optimove refuses the URL (it echoes nothing here, but any token in the error would be hidden)
    result = relay("listeners", "register", env=dict(env, RELAY_PUBLIC_URL="http://relay.example.com",
                                                     OPTIMOVE_API_KEY="wrong-" + KEY[::-1]))
    assert result.returncode == 1
    assert result.stderr == ('relay: GetRegisteredEventListeners failed: GET GetRegisteredEventListeners: '
                             'HTTP 401: "Unauthorized"\n')
