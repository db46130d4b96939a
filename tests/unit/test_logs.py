"""The log formats: JSON fields, context ids, exceptions on one line, secrets scrubbed; RELAY_LOG_FORMAT."""
from __future__ import annotations

import io
import json
import logging
from datetime import datetime

import pytest

from shared.logs import (ConsoleFormatter, ContextFilter, JsonFormatter, configure, log_context, resolve_format,
                         secret_values)
from shared.settings import Settings, SettingsError

TOKEN = "listener-token-0123456789abcdef"
API_KEY = "optimove-api-key-0123456789"
BEARER = "bonus-bearer-credential-0123"


def _logger(formatter: logging.Formatter) -> tuple[logging.Logger, io.StringIO]:
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.addFilter(ContextFilter())
    handler.setFormatter(formatter)
    logger = logging.getLogger(f"relay.test.{id(stream)}")
    logger.handlers = [handler]
    logger.propagate = False
    logger.setLevel(logging.DEBUG)
    return logger, stream


def _events(stream: io.StringIO) -> list[dict]:
    lines = stream.getvalue().splitlines()
    return [json.loads(line) for line in lines]


def test_json_line_has_fields_and_context_ids_as_keys():
    logger, stream = _logger(JsonFormatter())
    with log_context(task_id="abc-123", notification_id=7):
        with log_context(campaign_id=42, run_id=None):
            logger.info("notification %s: %s", 7, "granted")
    logger.warning("outside")
    first, second = _events(stream)
    assert first["message"] == "notification 7: granted"
    assert first["level"] == "INFO" and first["logger"] == logger.name
    assert first["task_id"] == "abc-123" and first["notification_id"] == 7 and first["campaign_id"] == 42
    assert "run_id" not in first  # None ids are left out
    assert first["ts"].endswith("Z") and datetime.fromisoformat(first["ts"].replace("Z", "+00:00")).utcoffset() \
        .total_seconds() == 0
    assert isinstance(first["pid"], int)
    assert second["message"] == "outside" and "notification_id" not in second and "exc" not in second


def test_exception_is_one_line_in_the_exc_field():
    logger, stream = _logger(JsonFormatter())
    try:
        raise ValueError("bad\nthing")
    except ValueError:
        with log_context(run_id=5):
            logger.exception("run failed\nacross lines")
    text = stream.getvalue()
    assert text.count("\n") == 1  # one event, one line
    (event,) = _events(stream)
    assert event["message"] == "run failed\nacross lines"
    assert event["exc"].startswith("Traceback") and "ValueError: bad\nthing" in event["exc"]
    assert event["run_id"] == 5 and event["level"] == "ERROR"


@pytest.mark.parametrize("formatter_class", [JsonFormatter, ConsoleFormatter])
def test_secrets_are_scrubbed(formatter_class):
    logger, stream = _logger(formatter_class([TOKEN, API_KEY]))
    logger.info("POST /optimove/events?token=%s&x=1", TOKEN)
    logger.info("calling with headers %s", {"X-API-KEY": API_KEY, "Content-Type": "application/json"})
    logger.info("unknown token in a URL: https://relay.example/optimove/events?token=zzzzzzzzzzzzzzzzzz")
    logger.info("header Authorization: Bearer %s sent", BEARER)
    logger.info("broker redis://:%s@redis:6379/0", "hunter2hunter2")
    try:
        raise RuntimeError(f"call to https://api.example/?apikey={API_KEY} failed")
    except RuntimeError:
        logger.exception("with a traceback")
    text = stream.getvalue()
    for secret in (TOKEN, API_KEY, "zzzzzzzzzzzzzzzzzz", BEARER, "hunter2hunter2"):
        assert secret not in text, secret
    assert "token=***" in text and "/optimove/events" in text and "Bearer ***" in text
    if formatter_class is JsonFormatter:
        assert all(json.loads(line) for line in text.splitlines())


def test_secret_values_of_settings_include_header_credentials():
    settings = Settings.from_env({"RELAY_LISTENER_TOKENS": f"{TOKEN},second-token-0123456789",
                                  "OPTIMOVE_API_URL": "https://api.example", "OPTIMOVE_API_KEY": API_KEY,
                                  "BONUS_AUTH_HEADER": f"Authorization: Bearer {BEARER}",
                                  "RELAY_ADMIN_PASSWORD": "admin-password-x"})
    values = secret_values(settings)
    for expected in (TOKEN, "second-token-0123456789", API_KEY, BEARER, f"Bearer {BEARER}", "admin-password-x"):
        assert expected in values
    logger, stream = _logger(JsonFormatter(values))
    logger.info("sent %s and %s and %s", BEARER, "second-token-0123456789", "admin-password-x")
    assert _events(stream)[0]["message"] == "sent *** and *** and ***"


def test_gunicorn_access_and_celery_task_lines_get_fields():
    logger, stream = _logger(JsonFormatter())
    access = logging.getLogger("gunicorn.access")
    record = access.makeRecord("gunicorn.access", logging.INFO, __file__, 1, '%(h)s "%(m)s %(U)s" %(s)s',
                               ({"h": "127.0.0.1", "m": "POST", "U": "/optimove/events", "s": "202",
                                 "b": "15", "M": "3", "q": f"token={TOKEN}"},), None)
    logger.handle(record)
    celery = logger.makeRecord("celery.app.trace", logging.INFO, __file__, 1, "Task %(name)s[%(id)s] succeeded",
                               ({"name": "relay.process_notification", "id": "t-1"},), None)
    logger.handle(celery)
    access_event, task_event = _events(stream)
    assert access_event["message"] == '127.0.0.1 "POST /optimove/events" 202'
    assert access_event["status"] == 202 and access_event["method"] == "POST" and access_event["duration_ms"] == 3
    assert TOKEN not in stream.getvalue()
    assert task_event["task_id"] == "t-1" and task_event["task"] == "relay.process_notification"


def test_console_format_unchanged():
    logger, stream = _logger(ConsoleFormatter())
    with log_context(notification_id=9):
        logger.info("hello")
    line = stream.getvalue()
    assert line.endswith(f"INFO [notification_id=9] {logger.name}: hello\n")


def test_resolve_format_auto_follows_the_terminal():
    class Tty(io.StringIO):
        def isatty(self):
            return True

    assert resolve_format(None, Tty()) == "console"
    assert resolve_format(None, io.StringIO()) == "json"
    assert resolve_format("json", Tty()) == "json" and resolve_format("console", io.StringIO()) == "console"


def test_setting_is_validated():
    assert Settings.from_env({}).log_format is None
    assert Settings.from_env({"RELAY_LOG_FORMAT": " JSON "}).log_format == "json"
    assert Settings.from_env({"RELAY_LOG_FORMAT": "console"}).log_format == "console"
    with pytest.raises(SettingsError) as err:
        Settings.from_env({"RELAY_LOG_FORMAT": "xml"})
    assert "RELAY_LOG_FORMAT: expected one of json, console" in str(err.value)
    assert Settings.from_env({"RELAY_LOG_FORMAT": "json"}).to_env()["RELAY_LOG_FORMAT"] == "json"


def test_configure_installs_the_chosen_format_on_the_root_logger():
    root = logging.getLogger()
    saved = root.handlers[:], root.level
    stream = io.StringIO()
    root.handlers = [logging.StreamHandler(stream)]
    try:
        configure("info", "json", [TOKEN])
        with log_context(campaign_id=3):
            logging.getLogger("relay.x").info("token %s", TOKEN)
        configure("info", "console")
        logging.getLogger("relay.x").info("now text")
    finally:
        root.handlers, level = saved
        root.setLevel(level)
        logging.captureWarnings(False)
    first, second = stream.getvalue().splitlines()
    assert json.loads(first)["campaign_id"] == 3 and json.loads(first)["message"] == "token ***"
    assert second.endswith("INFO [-] relay.x: now text")
