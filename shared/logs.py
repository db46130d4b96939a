"""Logging configured once per process; every line carries task, notification and campaign ids.

Two formats (`RELAY_LOG_FORMAT`): `console`, one readable text line per event with the ids in
`[context]`, and `json`, one JSON object per line with the ids as top-level keys. Unset means
json when stderr is not a terminal (containers, log collectors) and console on a terminal.
Both formats scrub secrets from every line: the configured secret values (listener tokens,
the admin password, the Optimove API key, auth headers) and anything that looks like one (a
`token=` query parameter, an `Authorization:`/`X-API-KEY:` header, a password in a URL).
Celery (workers/app.py) and gunicorn (`GunicornLogger`, `relay web`) log through the same format.
"""
from __future__ import annotations

import contextlib
import contextvars
import json
import logging
import re
import sys
from datetime import datetime, timezone
from typing import Any, Iterable, Iterator

_context: contextvars.ContextVar[dict] = contextvars.ContextVar("relay_log_context", default={})

FORMAT = "%(asctime)s %(levelname)s [%(context)s] %(name)s: %(message)s"
FORMATS = ("json", "console")


@contextlib.contextmanager
def log_context(**ids) -> Iterator[None]:
    """Add ids (task_id, notification_id, campaign_id, run_id) to every log line in the block."""
    token = _context.set({**_context.get(), **{k: v for k, v in ids.items() if v is not None}})
    try:
        yield
    finally:
        _context.reset(token)


class ContextFilter(logging.Filter):
    """Puts the current log context on each record as `%(context)s` (text) and `relay_context` (dict)."""

    def filter(self, record: logging.LogRecord) -> bool:
        ctx = _context.get()
        record.relay_context = ctx
        record.context = " ".join(f"{k}={v}" for k, v in ctx.items()) or "-"
        return True


# --- secrets ---------------------------------------------------------------------------------

REDACTED = "***"
# (pattern, replacement, texts one of which any match contains, in lower case: most lines, e.g. the
# access log's, hold none of them, and skipping the regular expressions saves ~40 us per line)
_PATTERNS = (
    # a secret in a query string: ?token=..., &api_key=..., &password=...
    (re.compile(r"([?&](?:token|access_token|api[_-]?key|apikey|key|password|passwd|secret)=)[^&\s#\"']+",
                re.IGNORECASE), r"\1" + REDACTED, ("=",)),
    # a credential header, in text or a repr'd dict: Authorization: Bearer x, 'X-API-KEY': 'x'
    (re.compile(r"((?:proxy-)?authorization|x-api-key|api-key)([\"']?\s*[:=]\s*[\"']?)"
                r"((?:bearer|basic|token)\s+)?[^\s\"',;}\]]+", re.IGNORECASE),
     r"\1\2\3" + REDACTED, ("authorization", "api-key")),
    # a password in a URL: redis://:secret@host, postgresql://user:secret@host
    (re.compile(r"(\b[a-z][a-z0-9+.-]*://[^/\s:@]*:)[^@\s/]+@", re.IGNORECASE), r"\1" + REDACTED + "@", ("://",)),
)


class Scrubber:
    """Replaces known secret values and secret-looking text with `***`."""

    def __init__(self, secrets: Iterable[str] = ()):
        # longest first, so a header line is replaced whole before its value alone
        self.secrets = tuple(sorted({s for s in secrets if s and len(s) >= 4}, key=len, reverse=True))

    def __call__(self, text: str) -> str:
        for secret in self.secrets:
            if secret in text:
                text = text.replace(secret, REDACTED)
        lower = text.lower()
        for pattern, replacement, needs in _PATTERNS:
            if any(n in lower for n in needs):
                text = pattern.sub(replacement, text)
        return text


def secret_values(settings) -> list[str]:
    """Every secret of `settings` as plain strings (and the value part of `Name: value` headers)."""
    from dataclasses import fields

    from shared.settings import Secret

    out: list[str] = []
    for f in fields(settings):
        value = getattr(settings, f.name)
        for item in value if isinstance(value, tuple) else (value,):
            if isinstance(item, Secret) and item.get():
                raw = item.get()
                out.append(raw)
                if f.metadata.get("env", "").endswith("_AUTH_HEADER"):
                    header_value = raw.partition(":")[2].strip()
                    out.append(header_value)
                    scheme, _, credential = header_value.partition(" ")
                    if credential.strip() and scheme.lower() in ("bearer", "basic", "token"):
                        out.append(credential.strip())
                elif f.metadata.get("env") == "FLOWER_BASIC_AUTH" and ":" in raw:
                    out.append(raw.partition(":")[2])
    return out


# --- formatters ------------------------------------------------------------------------------


class ConsoleFormatter(logging.Formatter):
    """The text format (`FORMAT`), scrubbed."""

    def __init__(self, secrets: Iterable[str] = ()):
        super().__init__(FORMAT)
        self.scrub = Scrubber(secrets)

    def format(self, record: logging.LogRecord) -> str:
        if not hasattr(record, "context"):
            ContextFilter().filter(record)
        return self.scrub(super().format(record))


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ts, level, logger, message, pid, the context ids, exc; scrubbed."""

    _ACCESS_FIELDS = (("method", "m"), ("path", "U"), ("status", "s"), ("bytes", "b"), ("duration_ms", "M"))

    def __init__(self, secrets: Iterable[str] = ()):
        super().__init__()
        self.scrub = Scrubber(secrets)

    def format(self, record: logging.LogRecord) -> str:
        try:
            message = record.getMessage()
        except Exception as exc:  # a bad format string must not lose the event
            message = f"{record.msg!r} (unformattable: {type(exc).__name__})"
        event: dict[str, Any] = {
            "ts": datetime.fromtimestamp(record.created, timezone.utc).isoformat(timespec="milliseconds")
                  .replace("+00:00", "Z"),
            "level": record.levelname,
            "logger": record.name,
            "message": self.scrub(message),
            "pid": record.process,
        }
        ctx = getattr(record, "relay_context", None)
        if ctx is None:
            ctx = _context.get()
        for key, value in ctx.items():
            event.setdefault(key, value if isinstance(value, (int, float, bool)) else self.scrub(str(value)))
        self._celery_fields(record, event)
        self._access_fields(record, event)
        if record.exc_info:
            event["exc"] = self.scrub(self.formatException(record.exc_info))
        elif record.exc_text:
            event["exc"] = self.scrub(record.exc_text)
        if record.stack_info:
            event["stack"] = self.scrub(self.formatStack(record.stack_info))
        # json.dumps escapes newlines: a traceback stays on the event's one line
        return json.dumps(event, default=str, ensure_ascii=False)

    @staticmethod
    def _celery_fields(record: logging.LogRecord, event: dict) -> None:
        """Celery's task lines ('Task x[id] received/succeeded') carry the task in their args."""
        args = record.args
        if record.name.startswith("celery") and isinstance(args, dict) and "id" in args:
            event.setdefault("task_id", str(args["id"]))
            if "name" in args:
                event.setdefault("task", str(args["name"]))

    def _access_fields(self, record: logging.LogRecord, event: dict) -> None:
        """gunicorn's access lines: the request as fields (never the query string, where the token is)."""
        if record.name != "gunicorn.access" or not isinstance(record.args, dict):
            return
        for key, atom in self._ACCESS_FIELDS:
            try:
                value = record.args[atom]
            except (KeyError, TypeError):
                continue
            if value in (None, "-"):
                continue
            if key in ("status", "bytes", "duration_ms"):
                try:
                    value = int(value)
                except (TypeError, ValueError):
                    pass
            event[key] = self.scrub(value) if isinstance(value, str) else value


def resolve_format(fmt: str | None, stream=None) -> str:
    """`fmt` when given; otherwise (auto) json unless `stream` (default stderr) is a terminal."""
    if fmt in FORMATS:
        return fmt
    stream = sys.stderr if stream is None else stream
    try:
        return "console" if stream is not None and stream.isatty() else "json"
    except (AttributeError, ValueError):
        return "json"


def make_formatter(fmt: str | None = None, secrets: Iterable[str] = ()) -> logging.Formatter:
    """The relay's formatter for `fmt` (json, console, or None for auto)."""
    return JsonFormatter(secrets) if resolve_format(fmt) == "json" else ConsoleFormatter(secrets)


def configure(level: str | int = "info", fmt: str | None = None, secrets: Iterable[str] = ()) -> None:
    """Install the relay's format and context filter on the root logger (idempotent).

    `fmt` is json, console or None (auto: json unless stderr is a terminal); `secrets` are
    values scrubbed from every line.
    """
    root = logging.getLogger()
    root.setLevel(level.upper() if isinstance(level, str) else level)
    formatter = make_formatter(fmt, secrets)
    for handler in root.handlers or [logging.StreamHandler()]:
        if not any(isinstance(f, ContextFilter) for f in handler.filters):
            handler.addFilter(ContextFilter())
        handler.setFormatter(formatter)
        if handler not in root.handlers:
            root.addHandler(handler)
    logging.captureWarnings(True)  # warnings become log events in the same format


def configure_for(settings, level: str | int | None = None) -> None:
    """`configure` with the level, format and secrets of `settings` (None: defaults, auto format)."""
    if settings is None:
        configure(level or "info")
        return
    configure(level or settings.log_level, settings.log_format, secret_values(settings))


def _gunicorn_logger_class():
    from gunicorn import glogging

    class GunicornLogger(glogging.Logger):
        """gunicorn's error and access logs in the relay's format (`relay web --logger-class`)."""

        def setup(self, cfg):
            super().setup(cfg)
            from shared.settings import Settings, SettingsError

            try:
                settings = Settings.from_env()
            except SettingsError:  # `relay web` validated them already; never fail on logging
                settings = None
            formatter = make_formatter(settings.log_format if settings else None,
                                       secret_values(settings) if settings else ())
            for log in (self.error_log, self.access_log):
                for handler in log.handlers:
                    if not any(isinstance(f, ContextFilter) for f in handler.filters):
                        handler.addFilter(ContextFilter())
                    handler.setFormatter(formatter)

    return GunicornLogger


def __getattr__(name: str):
    # gunicorn is imported only by the web process that asks for its logger class
    if name == "GunicornLogger":
        cls = _gunicorn_logger_class()
        globals()["GunicornLogger"] = cls
        return cls
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
