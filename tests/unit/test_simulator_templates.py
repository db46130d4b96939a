"""Fake Optimove: AddChannelTemplates and GetChannelTemplates."""

import pytest

from simulator.optimove import create_optimove_app

KEY = "test-key"
HEADERS = {"X-API-KEY": KEY}
ADD = "/integrations/AddChannelTemplates"
GET = "/integrations/GetChannelTemplates"


@pytest.fixture
def client():
    return create_optimove_app(KEY).test_client()


def templates(*ids, name="T"):
    return [{"TemplateID": i, "TemplateName": f"{name}{i}"} for i in ids]


def test_add_then_get_per_channel_upserting_by_id(client):
    ok = client.post(f"{ADD}?ChannelID=504", json=templates(1, 2), headers=HEADERS)
    assert ok.status_code == 200 and ok.data == b""
    assert client.post(f"{ADD}?ChannelID=504", json=templates(2, 3, name="New"), headers=HEADERS).status_code == 200
    assert client.post(f"{ADD}?ChannelID=505", json=templates(9), headers=HEADERS).status_code == 200
    assert client.get(f"{GET}?ChannelID=504", headers=HEADERS).json == [
        {"TemplateID": 1, "TemplateName": "T1"}, {"TemplateID": 2, "TemplateName": "New2"},
        {"TemplateID": 3, "TemplateName": "New3"}]
    assert client.get(f"{GET}?ChannelID=505", headers=HEADERS).json == templates(9)
    assert client.get(f"{GET}?ChannelID=506", headers=HEADERS).json == []
    stats = client.get("/_sim/stats").json["requests_by_function"]
    assert stats == {"AddChannelTemplates": 3, "GetChannelTemplates": 3}


@pytest.mark.parametrize("query, body", [
    ("", templates(1)),                                         # ChannelID missing
    ("?ChannelID=abc", templates(1)),                           # ChannelID not an integer
    ("?ChannelID=0", templates(1)),
    ("?ChannelID=504", templates(*range(1, 102))),              # more than 100
    ("?ChannelID=504", []),
    ("?ChannelID=504", {"TemplateID": 1, "TemplateName": "x"}),  # not an array
    ("?ChannelID=504", [{"TemplateID": "1", "TemplateName": "x"}]),
    ("?ChannelID=504", [{"TemplateID": True, "TemplateName": "x"}]),
    ("?ChannelID=504", [{"TemplateID": 1, "TemplateName": " "}]),
    ("?ChannelID=504", [{"TemplateID": 1}]),
    ("?ChannelID=504", [7]),
])
def test_bad_requests_are_400_with_a_bare_string_and_store_nothing(client, query, body):
    response = client.post(f"{ADD}{query}", json=body, headers=HEADERS)
    assert response.status_code == 400 and isinstance(response.json, str), response.json
    assert client.get(f"{GET}?ChannelID=504", headers=HEADERS).json == []


def test_exactly_100_is_accepted_and_content_type_is_strict(client):
    assert client.post(f"{ADD}?ChannelID=504", json=templates(*range(1, 101)), headers=HEADERS).status_code == 200
    assert len(client.get(f"{GET}?ChannelID=504", headers=HEADERS).json) == 100
    plain = client.post(f"{ADD}?ChannelID=504", data=b'[{"TemplateID": 1, "TemplateName": "x"}]',
                        headers=dict(HEADERS, **{"Content-Type": "text/plain"}))
    assert plain.status_code == 400


def test_get_requires_channel_and_key_and_reset_clears(client):
    assert client.get(GET, headers=HEADERS).status_code == 400
    assert client.get(f"{GET}?ChannelID=504").status_code == 401
    assert client.post(f"{GET}?ChannelID=504", json=[], headers=HEADERS).status_code == 405
    client.post(f"{ADD}?ChannelID=504", json=templates(1), headers=HEADERS)
    client.post("/_sim/reset")
    assert client.get(f"{GET}?ChannelID=504", headers=HEADERS).json == []
