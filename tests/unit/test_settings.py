"""Settings: read once from a mapping, validated, secrets hidden."""
from __future__ import annotations

import json
import logging

import pytest

from shared.settings import RateLimit, Secret, Settings, SettingsError, parse_rate_limit

GOOD = {"DATABASE_URL": "postgresql://u@h/db", "REDIS_URL": "redis://h:6379/0",
        "RELAY_LISTENER_TOKENS": "a" * 20 + "," + "b" * 20}


def test_defaults_and_values():
    s = Settings.from_env(GOOD)
    assert s.database_url == GOOD["DATABASE_URL"]
    assert [t.get() for t in s.listener_tokens] == ["a" * 20, "b" * 20]
    assert s.optimove_rate_limit == RateLimit(50, 10.0)
    assert s.optimove_page_size == 10_000 and s.max_body_bytes == 1024 * 1024
    assert s.bonus_mode == "batch" and s.bonus_batch_size == 500 and s.bonus_concurrency == 16
    assert s.channels.role(504) == "bonus"


@pytest.mark.parametrize("name,value,expected", [
    ("DATABASE_URL", "mysql://x/y", "DATABASE_URL: expected a URL starting with postgresql://"),
    ("REDIS_URL", "nonsense", "REDIS_URL: expected a URL"),
    ("RELAY_LISTENER_TOKENS", "short", "RELAY_LISTENER_TOKENS: expected tokens of at least 16 characters"),
    ("RELAY_LISTENER_TOKENS", " , ", "RELAY_LISTENER_TOKENS: expected one or more tokens"),
    ("OPTIMOVE_RATE_LIMIT", "fast", "OPTIMOVE_RATE_LIMIT: expected a rate such as 50/10s"),
    ("OPTIMOVE_PAGE_SIZE", "0", "OPTIMOVE_PAGE_SIZE: expected an integer between 1"),
    ("RELAY_MAX_BODY_BYTES", "1MB", "RELAY_MAX_BODY_BYTES: expected an integer >= 256"),
    ("BONUS_MODE", "bulk", "BONUS_MODE: expected one of batch, single"),
    ("BONUS_AUTH_HEADER", "Bearer abc", "BONUS_AUTH_HEADER: expected a header line 'Name: value'"),
    ("RELAY_SWEEP_AFTER", "-1", "RELAY_SWEEP_AFTER: expected a number >= 1"),
    ("SEND_URL", "ftp://platform/sends", "SEND_URL: expected a URL starting with http:// or https://"),
    ("SEND_MODE", "bulk", "SEND_MODE: expected one of batch, single"),
    ("SEND_BATCH_SIZE", "0", "SEND_BATCH_SIZE: expected an integer between 1 and 100000"),
    ("SEND_BATCH_SIZE", "lots", "SEND_BATCH_SIZE: expected an integer"),
    ("SEND_CONCURRENCY", "257", "SEND_CONCURRENCY: expected an integer between 1 and 256"),
    ("SEND_TIMEOUT", "0", "SEND_TIMEOUT: expected a number >= 0.1"),
    ("SEND_TIMEOUT", "soon", "SEND_TIMEOUT: expected a number"),
    ("SEND_MAX_ATTEMPTS", "101", "SEND_MAX_ATTEMPTS: expected an integer between 1 and 100"),
    ("SEND_AUTH_HEADER", "Bearer abc", "SEND_AUTH_HEADER: expected a header line 'Name: value'"),
    ("RELAY_REALTIME_GRANT_POLICY", "always",
     "RELAY_REALTIME_GRANT_POLICY: expected one of once_per_notification, once_per_campaign"),
])
def test_malformed_variable_named_with_expectation(name, value, expected):
    with pytest.raises(SettingsError) as err:
        Settings.from_env({**GOOD, name: value})
    assert expected in str(err.value)


def test_send_and_realtime_defaults_and_values():
    s = Settings.from_env(GOOD)
    assert (s.send_adapter, s.send_url, s.send_mode, s.send_batch_size, s.send_concurrency, s.send_timeout,
            s.send_max_attempts, s.send_auth_header) == ("http", None, "batch", 500, 16, 10.0, 8, None)
    assert s.realtime_grant_policy == "once_per_notification"
    s = Settings.from_env({**GOOD, "SEND_ADAPTER": "log", "SEND_URL": "https://platform.example/sends",
                           "SEND_MODE": "Single", "SEND_BATCH_SIZE": "100000", "SEND_CONCURRENCY": "1",
                           "SEND_TIMEOUT": "2.5", "SEND_MAX_ATTEMPTS": "3",
                           "SEND_AUTH_HEADER": "X-Api-Key: send-sekrit",
                           "RELAY_REALTIME_GRANT_POLICY": "once_per_campaign"})
    assert (s.send_adapter, s.send_url, s.send_mode, s.send_batch_size, s.send_concurrency, s.send_timeout,
            s.send_max_attempts) == ("log", "https://platform.example/sends", "single", 100_000, 1, 2.5, 3)
    assert s.send_auth_header.get() == "X-Api-Key: send-sekrit" and "send-sekrit" not in repr(s)
    assert s.realtime_grant_policy == "once_per_campaign"
    assert Settings.from_env(s.to_env()) == s


def test_every_problem_reported_at_once():
    with pytest.raises(SettingsError) as err:
        Settings.from_env({"DATABASE_URL": "x", "BONUS_MODE": "y", "OPTIMOVE_PAGE_SIZE": "z"})
    assert len(err.value.problems) == 3


def test_optimove_url_and_key_go_together():
    with pytest.raises(SettingsError, match="OPTIMOVE_API_URL and OPTIMOVE_API_KEY"):
        Settings.from_env({**GOOD, "OPTIMOVE_API_URL": "https://api5.optimove.net/current"})


def test_require_names_missing_variables():
    with pytest.raises(SettingsError, match="DATABASE_URL: required here but not set"):
        Settings.from_env({}).require("database_url")


def test_empty_value_counts_as_unset():
    assert Settings.from_env({**GOOD, "BONUS_URL": ""}).bonus_url is None


@pytest.mark.parametrize("raw,count,seconds", [("50/10s", 50, 10), ("50/10", 50, 10), ("2000/1h", 2000, 3600),
                                               ("100/m", 100, 60), (" 5 / 2.5s ", 5, 2.5)])
def test_rate_limits(raw, count, seconds):
    assert parse_rate_limit(raw) == RateLimit(count, seconds)


def test_secrets_never_shown(caplog):
    s = Settings.from_env({**GOOD, "OPTIMOVE_API_URL": "https://x.example/current", "OPTIMOVE_API_KEY": "sekrit-key",
                           "RELAY_ADMIN_PASSWORD": "pw-sekrit", "BONUS_AUTH_HEADER": "Authorization: Bearer tok-sekrit"})
    text = repr(s) + str(s)
    with caplog.at_level(logging.INFO):
        logging.getLogger("t").info("settings %s", s)
    for secret in ("sekrit-key", "pw-sekrit", "tok-sekrit", "a" * 20):
        assert secret not in text and secret not in caplog.text
    assert s.optimove_api_key.get() == "sekrit-key"
    assert repr(Secret("x")) == "Secret('***')"


def test_to_env_round_trips():
    s = Settings.from_env({**GOOD, "BONUS_MODE": "single", "OPTIMOVE_RATE_LIMIT": "20/2s"})
    assert Settings.from_env(s.to_env()) == s


def test_channel_config_file(tmp_path):
    path = tmp_path / "channels.json"
    path.write_text(json.dumps({"default_role": "bonus", "channels": {"504": {"role": "send"}, "505": "bonus"}}))
    s = Settings.from_env({**GOOD, "RELAY_CHANNEL_CONFIG": str(path)})
    assert s.channels.role(504) == "send" and s.channels.role(505) == "bonus" and s.channels.role(1) == "bonus"
    path.write_text(json.dumps({"channels": {"504": {"role": "grant"}}}))
    with pytest.raises(SettingsError, match="RELAY_CHANNEL_CONFIG"):
        Settings.from_env({**GOOD, "RELAY_CHANNEL_CONFIG": str(path)})
    with pytest.raises(SettingsError, match="no file at"):
        Settings.from_env({**GOOD, "RELAY_CHANNEL_CONFIG": str(tmp_path / "missing.json")})


def test_channel_config_accepts_extra_keys(tmp_path):
    path = tmp_path / "channels.json"
    path.write_text(json.dumps({"default_role": "send", "version": 2, "channels": {
        "504": {"role": "bonus", "events": [13]},
        "510": {"role": "send", "events": [11], "attributes": ["Email"], "template": "welcome"}}}))
    s = Settings.from_env({**GOOD, "RELAY_CHANNEL_CONFIG": str(path)})
    assert s.channels.role(504) == "bonus" and s.channels.role(510) == "send" and s.channels.role(1) == "send"


def test_cli_exits_2_naming_the_variable(monkeypatch):
    from click.testing import CliRunner

    from cli.main import main

    monkeypatch.setenv("OPTIMOVE_PAGE_SIZE", "lots")
    result = CliRunner().invoke(main, ["db", "upgrade"])
    assert result.exit_code == 2
    assert "OPTIMOVE_PAGE_SIZE: expected an integer" in result.output


def test_readme_documents_every_variable():
    from pathlib import Path

    from shared.settings import documented_variables

    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    missing = [env for env, _, _ in documented_variables() if f"`{env}`" not in readme]
    assert not missing, f"README.md configuration table lacks {missing}"


def test_channel_config_reads_attributes_events_and_conditional(tmp_path):
    path = tmp_path / "channels.json"
    path.write_text('{"conditional": true, "channels": {"510": {"role": "send", "events": [13, 11], '
                    '"attributes": ["Email", " Country "]}, "504": {"role": "bonus"}}}')
    s = Settings.from_env({**GOOD, "RELAY_CHANNEL_CONFIG": str(path)})
    assert s.channels.attribute_names(510) == ("Email", "Country")
    assert s.channels.attribute_names(504) == () and s.channels.attribute_names(None) == ()
    assert s.channels.events == {510: (13, 11)} and s.channels.conditional is True


@pytest.mark.parametrize("entry, message", [
    ('{"role": "send", "attributes": "Email"}', "'attributes' a list"),
    ('{"role": "send", "attributes": ["Email", ""]}', "'attributes' a list"),
    ('{"role": "send", "attributes": ["Email", "Email"]}', "distinct"),
    ('{"role": "send", "attributes": ["A;B"]}', "without ';'"),
    ('{"role": "send", "events": [12]}', "'events' a non-empty list of 11 and 13"),
    ('{"role": "send", "events": []}', "'events' a non-empty list"),
])
def test_channel_config_names_the_bad_key(tmp_path, entry, message):
    path = tmp_path / "channels.json"
    path.write_text('{"channels": {"510": %s}}' % entry)
    with pytest.raises(SettingsError, match="channel '510'") as info:
        Settings.from_env({**GOOD, "RELAY_CHANNEL_CONFIG": str(path)})
    assert message in str(info.value)


def test_timezone_and_release_interval_are_checked():
    s = Settings.from_env({**GOOD, "OPTIMOVE_TIMEZONE": "Europe/London", "RELAY_RELEASE_INTERVAL": "0.5",
                           "OPTIMOVE_REPORT_METRICS": "yes"})
    assert (s.optimove_timezone, s.release_interval_seconds, s.optimove_report_metrics) == \
        ("Europe/London", 0.5, True)
    with pytest.raises(SettingsError) as info:
        Settings.from_env({**GOOD, "OPTIMOVE_TIMEZONE": "Mars/Olympus", "RELAY_RELEASE_INTERVAL": "6",
                           "OPTIMOVE_REPORT_METRICS": "sometimes"})
    text = str(info.value)
    assert "OPTIMOVE_TIMEZONE: expected an IANA time zone" in text
    assert "RELAY_RELEASE_INTERVAL: expected a number >= 0.2 and <= 5" in text
    assert "OPTIMOVE_REPORT_METRICS: expected true or false" in text
