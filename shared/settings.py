"""The relay's settings: read from the environment once at start-up and validated.

Every process (web, worker, beat, CLI) builds one `Settings` with `Settings.from_env()`.
Nothing else in the code base reads `os.environ` for configuration. A missing or malformed
variable raises `SettingsError`, whose message names every bad variable and what is expected.
Secrets are wrapped in `Secret`, whose `repr`/`str` never show the value.
"""
from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Callable, Mapping
from urllib.parse import urlsplit


class SettingsError(Exception):
    """One or more environment variables are missing or malformed."""

    def __init__(self, problems: list[str]):
        self.problems = problems
        super().__init__("invalid configuration:\n  " + "\n  ".join(problems))


class Secret:
    """A string that never shows itself in logs, reprs or tracebacks."""

    __slots__ = ("_value",)

    def __init__(self, value: str):
        self._value = value

    def get(self) -> str:
        """Return the secret value; call only where it is sent, never where it is logged."""
        return self._value

    def __repr__(self) -> str:
        return "Secret('***')"

    __str__ = __repr__

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Secret) and other._value == self._value

    def __hash__(self) -> int:
        return hash(self._value)

    def __bool__(self) -> bool:
        return bool(self._value)


@dataclass(frozen=True)
class RateLimit:
    """`count` requests per `seconds` seconds (sliding window)."""

    count: int
    seconds: float

    def __str__(self) -> str:
        return f"{self.count}/{self.seconds:g}s"


@dataclass(frozen=True)
class ChannelConfig:
    """Per-channel roles (which channels grant bonuses and which send through a platform), the customer
    attributes a send channel asks Optimove for, and the event types each channel listens to."""

    roles: dict[int, str] = field(default_factory=dict)
    default_role: str = "bonus"
    attributes: dict[int, tuple[str, ...]] = field(default_factory=dict)
    events: dict[int, tuple[int, ...]] = field(default_factory=dict)
    conditional: bool = False

    def attribute_names(self, channel_id: int | None) -> tuple[str, ...]:
        """The customer attributes to request for `channel_id` (none when not configured)."""
        return self.attributes.get(int(channel_id), ()) if channel_id is not None else ()

    def role(self, channel_id: int | None) -> str:
        """The role of `channel_id` (`bonus` or `send`), the default one when not listed."""
        if channel_id is None:
            return self.default_role
        return self.roles.get(int(channel_id), self.default_role)


ROLES = ("bonus", "send")


def _url(schemes: tuple[str, ...]) -> Callable[[str], str]:
    def parse(raw: str) -> str:
        parts = urlsplit(raw)
        if parts.scheme.split("+")[0] not in schemes or not (parts.netloc or parts.path):
            raise ValueError(f"a URL starting with {' or '.join(s + '://' for s in schemes)}")
        return raw
    return parse


def _int(lo: int, hi: int | None = None) -> Callable[[str], int]:
    def parse(raw: str) -> int:
        try:
            value = int(raw.strip())
        except ValueError:
            raise ValueError(f"an integer >= {lo}") from None
        if value < lo or (hi is not None and value > hi):
            raise ValueError(f"an integer between {lo} and {hi}" if hi else f"an integer >= {lo}")
        return value
    return parse


def _float(lo: float, hi: float | None = None) -> Callable[[str], float]:
    expected = f"a number >= {lo:g}" + (f" and <= {hi:g}" if hi is not None else "")

    def parse(raw: str) -> float:
        try:
            value = float(raw.strip())
        except ValueError:
            raise ValueError(expected) from None
        if value < lo or (hi is not None and value > hi) or value != value:
            raise ValueError(expected)
        return value
    return parse


def _choice(*options: str) -> Callable[[str], str]:
    def parse(raw: str) -> str:
        value = raw.strip().lower()
        if value not in options:
            raise ValueError("one of " + ", ".join(options))
        return value
    return parse


_RATE = re.compile(r"^\s*(\d+)\s*/\s*(\d+(?:\.\d+)?)?\s*(s|sec|m|min|h)?\s*$")


def parse_rate_limit(raw: str) -> RateLimit:
    """Parse `50/10s`, `50/10`, `2000/1h`, `100/m` into a `RateLimit`."""
    match = _RATE.match(raw)
    if not match or int(match.group(1)) < 1:
        raise ValueError("a rate such as 50/10s (requests per window; units s, m or h)")
    amount = float(match.group(2) or 1)
    unit = {"s": 1, "sec": 1, "m": 60, "min": 60, "h": 3600}[match.group(3) or "s"]
    if amount * unit <= 0:
        raise ValueError("a rate with a window longer than zero")
    return RateLimit(int(match.group(1)), amount * unit)


def _tokens(raw: str) -> tuple[Secret, ...]:
    tokens = tuple(t.strip() for t in raw.split(",") if t.strip())
    if not tokens:
        raise ValueError("one or more tokens separated by commas")
    short = [t for t in tokens if len(t) < 16]
    if short:
        raise ValueError("tokens of at least 16 characters (a long random secret)")
    return tuple(Secret(t) for t in tokens)


def _secret(raw: str) -> Secret:
    if not raw.strip():
        raise ValueError("a non-empty value")
    return Secret(raw.strip())


def _header(raw: str) -> Secret:
    name, sep, value = raw.partition(":")
    if not sep or not name.strip() or not value.strip() or not re.match(r"^[A-Za-z0-9-]+$", name.strip()):
        raise ValueError("a header line 'Name: value', e.g. 'Authorization: Bearer abc'")
    return Secret(raw.strip())


def load_channel_config(path: str) -> ChannelConfig:
    """Read the channel config file (JSON): `{"default_role": "bonus", "channels": {"504": {"role": "send"}}}`."""
    try:
        data = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise ValueError(f"an existing JSON file (no file at {path})") from None
    except (OSError, json.JSONDecodeError) as exc:
        raise ValueError(f"a readable JSON file ({exc})") from None
    if not isinstance(data, dict):
        raise ValueError("a JSON object with 'channels'")
    default = data.get("default_role", "bonus")
    roles: dict[int, str] = {}
    attributes: dict[int, tuple[str, ...]] = {}
    events: dict[int, tuple[int, ...]] = {}
    for key, entry in (data.get("channels") or {}).items():
        role = entry.get("role") if isinstance(entry, dict) else entry
        if role not in ROLES or not str(key).strip().isdigit():
            raise ValueError(f"channel {key!r}: a numeric channel id with role one of {', '.join(ROLES)}")
        roles[int(key)] = role
        if isinstance(entry, dict) and entry.get("attributes") is not None:
            attributes[int(key)] = _attribute_names(key, entry["attributes"])
        if isinstance(entry, dict) and entry.get("events") is not None:
            events[int(key)] = _event_types(key, entry["events"])
    if default not in ROLES:
        raise ValueError(f"default_role one of {', '.join(ROLES)}")
    conditional = data.get("conditional", False)
    if not isinstance(conditional, bool):
        raise ValueError("'conditional' true or false")
    return ChannelConfig(roles=roles, default_role=default, attributes=attributes, events=events,
                         conditional=conditional)


def _attribute_names(key: str, value: Any) -> tuple[str, ...]:
    names = value if isinstance(value, list) else None
    if names is None or not all(isinstance(n, str) and n.strip() and ";" not in n for n in names) \
            or len({n.strip() for n in names}) != len(names):
        raise ValueError(f"channel {key!r}: 'attributes' a list of distinct, non-empty attribute names "
                         f"without ';' (got {value!r})")
    return tuple(n.strip() for n in names)


CHANNEL_EVENT_TYPES = (11, 13)


def _event_types(key: str, value: Any) -> tuple[int, ...]:
    if not isinstance(value, list) or not value or not all(
            isinstance(e, int) and not isinstance(e, bool) and e in CHANNEL_EVENT_TYPES for e in value):
        raise ValueError(f"channel {key!r}: 'events' a non-empty list of "
                         f"{' and '.join(map(str, CHANNEL_EVENT_TYPES))} (got {value!r})")
    return tuple(dict.fromkeys(value))


def _timezone(raw: str) -> str:
    from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

    name = raw.strip()
    try:
        ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError):
        raise ValueError(f"an IANA time zone such as UTC or Europe/London (got {name!r})") from None
    return name


def _host(raw: str) -> str:
    value = raw.strip()
    if not value or any(c.isspace() for c in value) or "/" in value:
        raise ValueError("an address to bind, such as 127.0.0.1 or 0.0.0.0")
    return value


def _flag(raw: str) -> bool:
    value = raw.strip().lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"true or false (got {raw!r})")


def _opt(env: str, parse: Callable[[str], Any] | None = None, default: Any = None, doc: str = "") -> Any:
    return field(default=default, metadata={"env": env, "parse": parse or (lambda s: s.strip()), "doc": doc})


@dataclass(frozen=True)
class Settings:
    """Every setting of the relay. Field metadata names the environment variable."""

    database_url: str | None = _opt("DATABASE_URL", _url(("postgresql", "postgres")),
                                     doc="Postgres URL; unset means `relay up` starts an embedded one")
    redis_url: str | None = _opt("REDIS_URL", _url(("redis", "rediss", "unix", "amqp")),
                                 doc="rate-limit store, and the Celery broker unless BROKER_URL is set; unset means "
                                     "`relay up` starts an embedded Redis")
    broker_url: str | None = _opt("BROKER_URL", _url(("redis", "rediss", "unix", "amqp", "amqps")),
                                  doc="Celery broker: Redis (redis://) or RabbitMQ "
                                      "(amqp://user:password@host:5672/vhost); unset: REDIS_URL")
    listener_tokens: tuple[Secret, ...] = _opt("RELAY_LISTENER_TOKENS", _tokens, (),
                                               doc="comma-separated listener secrets (>=16 chars each)")
    public_url: str | None = _opt("RELAY_PUBLIC_URL", _url(("http", "https")),
                                  doc="public base URL of the listener (for registration and display)")
    max_body_bytes: int = _opt("RELAY_MAX_BODY_BYTES", _int(256), 1024 * 1024, "largest accepted body")
    sweep_after_seconds: float = _opt("RELAY_SWEEP_AFTER", _float(1), 60.0,
                                      "age after which unfinished work is re-driven")
    sweep_interval_seconds: float = _opt("RELAY_SWEEP_INTERVAL", _float(1), 30.0, "how often beat runs the sweeper")
    max_attempts: int = _opt("RELAY_MAX_ATTEMPTS", _int(1, 100), 5, "attempts per notification before it is parked")
    visibility_timeout: int = _opt("RELAY_VISIBILITY_TIMEOUT", _int(120), 1800,
                                   "seconds before Redis redelivers an unacked task")
    admin_user: str = _opt("RELAY_ADMIN_USER", None, "admin", "basic-auth user for /api/")
    admin_password: Secret | None = _opt("RELAY_ADMIN_PASSWORD", _secret, doc="basic-auth password for /api/")
    channel_config_path: str | None = _opt("RELAY_CHANNEL_CONFIG", doc="path of the channel roles JSON file")
    log_level: str = _opt("RELAY_LOG_LEVEL", _choice("debug", "info", "warning", "error"), "info")
    log_format: str | None = _opt("RELAY_LOG_FORMAT", _choice("json", "console"),
                                  doc="json (one JSON object per line) or console; unset: json unless stderr "
                                      "is a terminal")
    optimove_api_url: str | None = _opt("OPTIMOVE_API_URL", _url(("http", "https")),
                                        doc="Optimove API base, e.g. https://api5.optimove.net/current")
    optimove_api_key: Secret | None = _opt("OPTIMOVE_API_KEY", _secret, doc="Optimove X-API-KEY")
    optimove_rate_limit: RateLimit = _opt("OPTIMOVE_RATE_LIMIT", parse_rate_limit, RateLimit(50, 10.0))
    optimove_page_size: int = _opt("OPTIMOVE_PAGE_SIZE", _int(1, 1_000_000), 10_000)
    optimove_timeout: float = _opt("OPTIMOVE_TIMEOUT", _float(0.1), 30.0, "seconds per Optimove call")
    optimove_max_attempts: int = _opt("OPTIMOVE_MAX_ATTEMPTS", _int(1, 100), 8)
    optimove_timezone: str = _opt("OPTIMOVE_TIMEZONE", _timezone, "UTC",
                                  "time zone of Optimove's ScheduledTime and ClearanceRequiredBy values")
    optimove_report_metrics: bool = _opt("OPTIMOVE_REPORT_METRICS", _flag, False,
                                         "report sends per template to Optimove (UpdateCampaignMetrics) when a "
                                         "send run completes")
    optimove_sent_metric_id: int = _opt("OPTIMOVE_SENT_METRIC_ID", _int(0, 10_000), 0,
                                        "MetricID of the 'sent' count in UpdateCampaignMetrics")
    deactivation: bool = _opt("RELAY_DEACTIVATION", _flag, False,
                              "revoke the promotions of Optimove actions that ended (GetCustomersActionEndedByDate), "
                              "once per date")
    release_interval_seconds: float = _opt("RELAY_RELEASE_INTERVAL", _float(0.2, 5), 2.0,
                                           "how often beat releases timed sends that are due (at most 5)")
    bonus_adapter: str = _opt("BONUS_ADAPTER", None, "http", "bonus adapter name (entry point)")
    bonus_url: str | None = _opt("BONUS_URL", _url(("http", "https")), doc="bonus system endpoint")
    bonus_mode: str = _opt("BONUS_MODE", _choice("batch", "single"), "batch")
    bonus_batch_size: int = _opt("BONUS_BATCH_SIZE", _int(1, 100_000), 500)
    bonus_concurrency: int = _opt("BONUS_CONCURRENCY", _int(1, 256), 16)
    bonus_max_attempts: int = _opt("BONUS_MAX_ATTEMPTS", _int(1, 100), 8)
    bonus_timeout: float = _opt("BONUS_TIMEOUT", _float(0.1), 10.0)
    bonus_revoke_url: str | None = _opt("BONUS_REVOKE_URL", _url(("http", "https")),
                                        doc="bonus system endpoint that revokes grants of cancelled campaigns")
    bonus_auth_header: Secret | None = _opt("BONUS_AUTH_HEADER", _header, doc="'Name: value' sent to the bonus system")
    send_adapter: str = _opt("SEND_ADAPTER", None, "http", "send adapter name: http, log, fake or an entry point")
    send_url: str | None = _opt("SEND_URL", _url(("http", "https")), doc="marketing platform send endpoint")
    send_mode: str = _opt("SEND_MODE", _choice("batch", "single"), "batch",
                          "batch (one POST per chunk) or single (one POST per send)")
    send_batch_size: int = _opt("SEND_BATCH_SIZE", _int(1, 100_000), 500, "sends per batch call")
    send_concurrency: int = _opt("SEND_CONCURRENCY", _int(1, 256), 16, "concurrent calls per task in single mode")
    send_timeout: float = _opt("SEND_TIMEOUT", _float(0.1), 10.0, "seconds per send call")
    send_max_attempts: int = _opt("SEND_MAX_ATTEMPTS", _int(1, 100), 8, "attempts per send before it is parked")
    send_auth_header: Secret | None = _opt("SEND_AUTH_HEADER", _header, doc="'Name: value' sent to the platform")
    realtime_grant_policy: str = _opt("RELAY_REALTIME_GRANT_POLICY",
                                      _choice("once_per_notification", "once_per_campaign"),
                                      "once_per_notification",
                                      "how often a real-time campaign may grant one promo code to one customer")
    flower_basic_auth: Secret | None = _opt("FLOWER_BASIC_AUTH", _secret, doc="user:password for Flower")
    worker_metrics_port: int | None = _opt("RELAY_WORKER_METRICS_PORT", _int(0, 65535),
                                           doc="port on which each `relay worker` serves its own Prometheus metrics "
                                               "(pool children included); 0 or unset: none. `relay up` gives its "
                                               "workers 9400 and up (this value, when set, as the first)")
    worker_metrics_bind: str = _opt("RELAY_WORKER_METRICS_BIND", _host, "127.0.0.1",
                                    "address the worker metrics port binds (0.0.0.0 in containers)")
    channels: ChannelConfig = field(default_factory=ChannelConfig)

    @property
    def celery_broker_url(self) -> str | None:
        """The Celery broker: `BROKER_URL`, else `REDIS_URL` (which always holds the rate limiter)."""
        return self.broker_url or self.redis_url

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, **overrides: Any) -> "Settings":
        """Build and validate settings from `environ` (default `os.environ`)."""
        environ = os.environ if environ is None else environ
        values: dict[str, Any] = {}
        problems: list[str] = []
        for f in fields(cls):
            env = f.metadata.get("env")
            if not env or env not in environ or environ[env] == "":
                continue
            try:
                values[f.name] = f.metadata["parse"](environ[env])
            except ValueError as exc:
                problems.append(f"{env}: expected {exc}")
        path = environ.get("RELAY_CHANNEL_CONFIG")
        if path:
            try:
                values["channels"] = load_channel_config(path)
            except ValueError as exc:
                problems.append(f"RELAY_CHANNEL_CONFIG: expected {exc}")
        if bool(values.get("optimove_api_url")) != bool(values.get("optimove_api_key")):
            problems.append("OPTIMOVE_API_URL and OPTIMOVE_API_KEY: expected both set or both unset")
        if problems:
            raise SettingsError(problems)
        values.update(overrides)
        return cls(**values)

    def require(self, *names: str) -> "Settings":
        """Raise `SettingsError` naming each of `names` (field names) that is unset."""
        env = {f.name: f.metadata.get("env", f.name) for f in fields(self)}
        missing = [f"{env[n]}: required here but not set" for n in names if not getattr(self, n)]
        if missing:
            raise SettingsError(missing)
        return self

    def to_env(self) -> dict[str, str]:
        """The environment that reproduces these settings in a child process (includes secrets)."""
        out: dict[str, str] = {}
        for f in fields(self):
            env = f.metadata.get("env")
            value = getattr(self, f.name)
            if not env or value is None or value == () or value == f.default:
                continue
            if isinstance(value, Secret):
                value = value.get()
            elif isinstance(value, tuple):
                value = ",".join(v.get() if isinstance(v, Secret) else str(v) for v in value)
            out[env] = str(value)
        return out


def documented_variables() -> list[tuple[str, str, str]]:
    """(variable, default, description) for every setting; the README table is checked against it."""
    rows = []
    for f in fields(Settings):
        env = f.metadata.get("env")
        if env:
            default = "" if f.default is None or f.default == () else str(f.default)
            rows.append((env, default, f.metadata.get("doc", "")))
    return rows
