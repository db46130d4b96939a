"""`relay listeners`: the pure planning (config + registered list -> plan), parsing and token hiding;
and the fake Optimove's listener functions."""
from __future__ import annotations

import pytest

from cli.listeners import (Listener, Out, Registered, listener_url, parse_registered, plan_listeners, same_url,
                           wanted_listeners)
from shared.settings import ChannelConfig
from simulator.optimove import create_optimove_app

TOKEN = "tok-0123456789abcdef"
URL = f"https://relay.example.com/optimove/events?token={TOKEN}"
CONFIG = ChannelConfig(roles={504: "bonus", 510: "send", 505: "bonus"}, events={510: (13, 11), 505: (11,)},
                       conditional=True)


def reg(event, channel=None, url=URL):
    return Registered(Listener(event, channel), url)


def test_wanted_listeners_follow_the_channel_config():
    assert wanted_listeners(CONFIG) == [Listener(13, 504), Listener(11, 505), Listener(13, 510), Listener(11, 510),
                                        Listener(4), Listener(5)]
    assert wanted_listeners(ChannelConfig()) == [Listener(4)]
    assert wanted_listeners(ChannelConfig(roles={504: "bonus"})) == [Listener(13, 504), Listener(4)]


def test_listener_url_joins_the_public_url_and_encodes_the_token():
    assert listener_url("https://relay.example.com/", TOKEN) == URL
    assert listener_url("https://x.example/relay", "a&b=c/d" * 3) == \
        "https://x.example/relay/optimove/events?token=" + "a%26b%3Dc%2Fd" * 3


def test_nothing_registered_plans_everything():
    plan = plan_listeners(CONFIG, [], URL)
    assert [(s.listener, s.action, s.current) for s in plan.steps] == [
        (listener, "register", None) for listener in wanted_listeners(CONFIG)]
    assert plan.extra == () and plan.already_right == [] and len(plan.to_register) == 6


def test_everything_right_plans_nothing():
    plan = plan_listeners(CONFIG, [reg(l.event, l.channel) for l in wanted_listeners(CONFIG)], URL)
    assert plan.to_register == [] and len(plan.already_right) == 6


def test_another_url_counts_as_differing_and_extras_are_reported_not_planned():
    old = "https://old.example.com/optimove/events?token=" + TOKEN
    registered = [reg(13, 504), reg(13, 510, old), reg(4), reg(1), reg(13, 999, old), reg(5, url=URL + "x")]
    plan = plan_listeners(CONFIG, registered, URL)
    steps = {s.listener: (s.action, s.current) for s in plan.steps}
    assert steps == {Listener(11, 505): ("register", None), Listener(13, 504): ("ok", None),
                     Listener(13, 510): ("register", old), Listener(11, 510): ("register", None),
                     Listener(4): ("ok", None), Listener(5): ("register", URL + "x")}
    assert [e.listener for e in plan.extra] == [Listener(1), Listener(13, 999)]


def test_a_url_encoded_registration_is_the_same_url():
    encoded = "https%3A%2F%2Frelay.example.com%2Foptimove%2Fevents%3Ftoken%3D" + TOKEN
    assert same_url(encoded, URL) and not same_url(URL.replace("relay.", "other."), URL)
    plan = plan_listeners(ChannelConfig(), [reg(4, url=encoded)], URL)
    assert plan.to_register == []


def test_conditional_off_does_not_want_event_5_and_lists_it_as_extra():
    plan = plan_listeners(ChannelConfig(roles={504: "bonus"}), [reg(5)], URL)
    assert [s.listener for s in plan.to_register] == [Listener(13, 504), Listener(4)]
    assert [e.listener for e in plan.extra] == [Listener(5)]


def test_parse_registered_is_loose_about_keys_and_channel_less_values():
    rows = [{"EventTypeID": 13, "ChannelID": 504, "ListenerURL": "u1"},
            {"eventTypeId": "4", "channelId": 0, "listenerUrl": "u2"},
            {"event_type_id": 5, "ChannelID": None, "ListenerURL": "u3"},
            {"EventTypeID": 11, "URL": "u4", "ChannelID": "510"},
            {"EventTypeID": 13}, "junk", {"EventTypeID": 13, "ChannelID": "x", "ListenerURL": "u5"}]
    found, unreadable = parse_registered(rows)
    assert [(e.listener, e.url) for e in found] == [(Listener(13, 504), "u1"), (Listener(4), "u2"),
                                                    (Listener(5), "u3"), (Listener(11, 510), "u4")]
    assert unreadable == rows[4:]
    assert parse_registered(None) == ([], [])
    with pytest.raises(ValueError):
        parse_registered({"Listeners": []})


def test_out_hides_token_values_and_known_tokens():
    out = Out(secrets=[TOKEN])
    assert out.hide(f"url {URL} and {URL}&x=1") == \
        "url https://relay.example.com/optimove/events?token=*** and " \
        "https://relay.example.com/optimove/events?token=***&x=1"
    assert out.hide("https%3A%2F%2Fh%2Fe%3Ftoken%3Dabcdef%26x%3D1") == "https%3A%2F%2Fh%2Fe%3Ftoken%3D***%26x%3D1"
    assert out.hide(f"error: bad {TOKEN}!") == "error: bad ***!"
    assert out.hide("some-other-old-token-value in ?token=other-old-token") == \
        "some-other-old-token-value in ?token=***"
    assert Out(show_secrets=True, secrets=[TOKEN]).hide(URL) == URL


# --- the fake Optimove's listener functions -------------------------------------------------------

KEY = "test-key"
HEADERS = {"X-API-KEY": KEY}


@pytest.fixture
def client():
    return create_optimove_app(KEY).test_client()


def listed(client):
    response = client.get("/general/GetRegisteredEventListeners", headers=HEADERS)
    assert response.status_code == 200
    return response.json


def register(client, **body):
    return client.post("/general/RegisterEventListener", json=body, headers=HEADERS)


def test_fake_stores_per_event_and_channel_and_replaces_the_url(client):
    assert listed(client) == []
    for body in ({"EventTypeID": 13, "ChannelID": 510, "ListenerURL": "http://a/x?token=1"},
                 {"EventTypeID": 4, "ListenerURL": "http://a/x?token=1"},
                 {"EventTypeID": 13, "ChannelID": 504, "ListenerURL": "http://a/x?token=1"},
                 {"EventTypeID": 13, "ChannelID": 510, "ListenerURL": "http://b/x?token=2"}):
        assert register(client, **body).status_code == 200
    assert listed(client) == [{"EventTypeID": 4, "ListenerURL": "http://a/x?token=1"},
                              {"EventTypeID": 13, "ListenerURL": "http://a/x?token=1", "ChannelID": 504},
                              {"EventTypeID": 13, "ListenerURL": "http://b/x?token=2", "ChannelID": 510}]


def test_fake_rejects_malformed_registrations(client):
    for body in ({"EventTypeID": 13}, {"ListenerURL": "http://a"}, {"EventTypeID": "13", "ListenerURL": "http://a"},
                 {"EventTypeID": 13, "ListenerURL": "ftp://a"}, {"EventTypeID": 13, "ListenerURL": "http://a",
                                                                 "ChannelID": "504"},
                 {"EventTypeID": 5, "ChannelID": 504, "ListenerURL": "http://a"}):
        assert register(client, **body).status_code == 400, body
    assert register(client, EventTypeID=5, ListenerURL="http://a").status_code == 200


def test_fake_unregister_by_type_or_by_channel(client):
    for channel in (504, 505, None):
        body = {"EventTypeID": 13, "ListenerURL": "http://a"} | ({"ChannelID": channel} if channel else {})
        assert register(client, **body).status_code == 200
    register(client, EventTypeID=4, ListenerURL="http://a")
    unregister = "/general/UnregisterEventListener"
    assert client.post(unregister, json={"EventTypeID": 13, "ChannelID": 504}, headers=HEADERS).status_code == 200
    assert [(r["EventTypeID"], r.get("ChannelID")) for r in listed(client)] == [(4, None), (13, None), (13, 505)]
    assert client.post(unregister, json={"EventTypeID": 13}, headers=HEADERS).status_code == 200
    assert [(r["EventTypeID"], r.get("ChannelID")) for r in listed(client)] == [(4, None)]
    assert client.post(unregister, json={"EventTypeID": 11}, headers=HEADERS).status_code == 200
    assert client.post(unregister, json={}, headers=HEADERS).status_code == 400


# --- the commands with a stand-in client: Optimove answers OK but does not do what was asked ------

class StandInClient:
    """Keeps listeners like the fake, except that it may ignore registrations or unregister by type only."""

    def __init__(self, rows, ignore_register=False, by_type_only=False):
        self.rows, self.ignore_register, self.by_type_only = rows, ignore_register, by_type_only
        self.posts = []

    def get(self, category, function, params=None):
        assert (category, function) == ("general", "GetRegisteredEventListeners")
        return [dict(r) for r in self.rows]

    def post(self, category, function, body, params=None):
        self.posts.append((function, body))
        if function == "RegisterEventListener" and not self.ignore_register:
            self.rows = [r for r in self.rows if (r["EventTypeID"], r.get("ChannelID"))
                         != (body["EventTypeID"], body.get("ChannelID"))] + [body]
        if function == "UnregisterEventListener":
            self.rows = [r for r in self.rows if r["EventTypeID"] != body["EventTypeID"]
                         or (not self.by_type_only and "ChannelID" in body and r.get("ChannelID") != body["ChannelID"])]

    def close(self):
        pass


@pytest.fixture
def run(monkeypatch, tmp_path):
    from click.testing import CliRunner

    import cli.listeners as module

    path = tmp_path / "channels.json"
    path.write_text('{"channels": {"504": {"role": "bonus"}, "505": {"role": "bonus"}}}')
    for name in [n for n in __import__("os").environ if n.startswith(("RELAY_", "OPTIMOVE_", "REDIS_", "DATABASE_"))]:
        monkeypatch.delenv(name)
    env = {"OPTIMOVE_API_URL": "http://optimove.invalid", "OPTIMOVE_API_KEY": "k" * 20,
           "RELAY_PUBLIC_URL": "https://relay.example.com", "RELAY_LISTENER_TOKENS": TOKEN,
           "RELAY_CHANNEL_CONFIG": str(path)}

    def invoke(client, *args):
        monkeypatch.setattr(module, "client_for", lambda settings: client)
        result = CliRunner().invoke(module.listeners, list(args), env=env)
        assert TOKEN not in result.output
        return result

    return invoke


def test_a_registration_optimove_does_not_list_afterwards_fails(run):
    client = StandInClient([], ignore_register=True)
    result = run(client, "register")
    assert result.exit_code == 1
    assert "  NOT registered  EventTypeID 13 ChannelID 504: Optimove lists nothing" in result.output
    assert "relay: 3 listeners registered but not listed by GetRegisteredEventListeners with this URL afterwards" \
        in result.output
    assert [f for f, _ in client.posts] == ["RegisterEventListener"] * 3


def test_unregister_names_registrations_optimove_removed_beyond_the_channel(run):
    rows = [{"EventTypeID": 13, "ChannelID": c, "ListenerURL": URL} for c in (504, 505)]
    client = StandInClient(rows, by_type_only=True)
    result = run(client, "unregister", "--event", "13", "--channel", "504")
    assert result.exit_code == 0
    assert "  unregistered    EventTypeID 13 ChannelID 505: " \
           "https://relay.example.com/optimove/events?token=***" in result.output
    assert "warning: Optimove also removed 1 listener not asked for" in result.output
    assert result.output.splitlines()[-1] == "2 listeners unregistered (EventTypeID 13 ChannelID 504)"
    assert client.posts == [("UnregisterEventListener", {"EventTypeID": 13, "ChannelID": 504})]
