"""`relay listeners`: register the relay's listener URL with Optimove (RegisterEventListener), list and
unregister registrations. Needs the Optimove settings, RELAY_PUBLIC_URL, RELAY_LISTENER_TOKENS and the
channel config only: never the database.

`register` is idempotent: it reads `GetRegisteredEventListeners` first and registers only what is
missing or points at another URL. Registering an (EventTypeID, ChannelID) again replaces its URL
(protocol doc 4.1: "only repeat to change the URL or add channels"), so nothing is unregistered
first and the relay is never left without a listener. After registering, the list is read again to
check that Optimove now has exactly the wanted URLs (the doc leaves the response shape and
ListenerURL encoding unconfirmed).

`plan_listeners` (config + registered list -> plan) is pure; the commands around it do the calls.
The listener token never appears in output: every `token=` value in a URL shows as `***` and every
configured token is redacted from any text, unless `--show-secrets`.
"""
from __future__ import annotations

import json
import re
import sys
from dataclasses import dataclass
from typing import Any, Iterable, Mapping, NoReturn, Sequence
from urllib.parse import quote, unquote

import click

from cli.optimove_setup import client_for, redis_errors
from shared.redact import redact
from shared.settings import ChannelConfig, Settings, SettingsError

OPTIMOVE_SETTINGS = ("optimove_api_url", "optimove_api_key")
REGISTER_SETTINGS = (*OPTIMOVE_SETTINGS, "public_url", "listener_tokens")
LISTENER_PATH = "/optimove/events"
DEFAULT_CHANNEL_EVENTS = (13,)
CANCEL_EVENT = 4        # always registered, without a channel
CONDITIONAL_EVENT = 5   # registered without a channel when the channel config says "conditional": true
CATEGORY = "general"
REGISTER, UNREGISTER, LIST = "RegisterEventListener", "UnregisterEventListener", "GetRegisteredEventListeners"


# --- pure part: what should be registered, what is, and the plan ---------------------------------

@dataclass(frozen=True, order=True)
class Listener:
    """One registration slot: an event type, optionally limited to one channel."""

    event: int
    channel: int | None = None

    def __str__(self) -> str:
        return f"EventTypeID {self.event}" + (f" ChannelID {self.channel}" if self.channel is not None
                                              else " (no channel)")

    def body(self, url: str) -> dict[str, Any]:
        """The RegisterEventListener body."""
        body: dict[str, Any] = {"EventTypeID": self.event}
        if self.channel is not None:
            body["ChannelID"] = self.channel
        body["ListenerURL"] = url
        return body


@dataclass(frozen=True)
class Registered:
    """A registration as Optimove listed it (`raw` is the row it returned)."""

    listener: Listener
    url: str
    raw: Any = None


@dataclass(frozen=True)
class Step:
    """What to do about one wanted listener: `ok` (already right) or `register` (missing: `current`
    is None; registered with another URL: `current` is that URL)."""

    listener: Listener
    action: str
    current: str | None = None


@dataclass(frozen=True)
class Plan:
    """The steps for every wanted listener, in config order, and registrations the config does not ask for."""

    url: str
    steps: tuple[Step, ...]
    extra: tuple[Registered, ...]

    @property
    def to_register(self) -> list[Step]:
        return [s for s in self.steps if s.action == "register"]

    @property
    def already_right(self) -> list[Step]:
        return [s for s in self.steps if s.action == "ok"]


def listener_url(public_url: str, token: str) -> str:
    """`RELAY_PUBLIC_URL` + `/optimove/events?token=<token>` (a path in the public URL is kept)."""
    return f"{public_url.rstrip('/')}{LISTENER_PATH}?token={quote(token, safe='')}"


def wanted_listeners(channels: ChannelConfig) -> list[Listener]:
    """Per configured channel (by id) each event type of its `events` (default 13) with its ChannelID;
    then EventTypeID 4 without a channel; then 5 without a channel when `conditional`."""
    wanted = [Listener(event, channel)
              for channel in sorted(set(channels.roles) | set(channels.events))
              for event in channels.events.get(channel, DEFAULT_CHANNEL_EVENTS)]
    wanted.append(Listener(CANCEL_EVENT))
    if channels.conditional:
        wanted.append(Listener(CONDITIONAL_EVENT))
    return wanted


def same_url(a: str, b: str) -> bool:
    """Equal once URL-decoded (Optimove may store ListenerURL encoded) and without surrounding blanks."""
    return unquote(a.strip()) == unquote(b.strip())


def plan_listeners(channels: ChannelConfig, registered: Iterable[Registered], url: str) -> Plan:
    """Compare what the config asks for with what Optimove has; pure."""
    have: dict[Listener, list[Registered]] = {}
    for entry in registered:
        have.setdefault(entry.listener, []).append(entry)
    wanted = wanted_listeners(channels)
    steps = []
    for listener in wanted:
        entries = have.get(listener, [])
        if entries and all(same_url(e.url, url) for e in entries):
            steps.append(Step(listener, "ok"))
        else:
            other = next((e.url for e in entries if not same_url(e.url, url)), None)
            steps.append(Step(listener, "register", other))
    extra = tuple(e for listener in sorted(have, key=_order) if listener not in set(wanted) for e in have[listener])
    return Plan(url, tuple(steps), extra)


def _order(listener: Listener) -> tuple[int, int]:
    return listener.event, listener.channel or 0


def _key(name: str) -> str:
    return re.sub(r"[\s_\-]", "", str(name)).lower()


def _as_int(value: Any) -> int | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, str) and value.strip().lstrip("+").isdigit():
        return int(value)
    return None


def parse_registered(data: Any) -> tuple[list[Registered], list[Any]]:
    """GetRegisteredEventListeners' reply as `Registered` entries and the rows that could not be read.

    The response fields are unconfirmed (protocol doc 4.2), so keys match loosely (`EventTypeID`,
    `eventTypeId`, `event_type_id`; `ListenerURL`/`ListenerUrl`/`URL`); a ChannelID of 0, null or
    absent means no channel. An empty reply is no registrations.
    """
    if data is None:
        return [], []
    if not isinstance(data, list):
        raise ValueError(f"expected a JSON array, got {type(data).__name__}")
    found, unreadable = [], []
    for row in data:
        fields = {_key(k): v for k, v in row.items()} if isinstance(row, Mapping) else {}
        event = _as_int(fields.get("eventtypeid", fields.get("eventtype")))
        url = next((fields[k] for k in ("listenerurl", "url") if isinstance(fields.get(k), str)), None)
        channel_raw = fields.get("channelid")
        channel = _as_int(channel_raw)
        if event is None or url is None or (channel_raw not in (None, "") and channel is None):
            unreadable.append(row)
            continue
        found.append(Registered(Listener(event, channel or None), url, row))
    return found, unreadable


# --- output that hides the token ------------------------------------------------------------------

# `token=VALUE` in a URL, and its URL-encoded form `token%3DVALUE` (a URL inside a URL).
_TOKEN_PARAMS = (re.compile(r"(\btoken=)[^&#\s\"'<>]+", re.IGNORECASE),
                 re.compile(r"((?:\b|%3F|%26)token%3D)(?:(?!%26|%23)[^&#\s\"'<>])+", re.IGNORECASE))


class Out:
    """Echo to stdout/stderr with secrets hidden: `token=` values in URLs and every configured token."""

    def __init__(self, show_secrets: bool = False, secrets: Sequence[str] = ()):
        self.show_secrets = show_secrets
        self.secrets: list[str] = []
        self.add_secrets(secrets)

    def add_secrets(self, secrets: Iterable[str]) -> None:
        """Also redact each of `secrets`, plain and URL-encoded (once and twice)."""
        for secret in secrets:
            if secret:
                once = quote(secret, safe="")
                self.secrets.extend({secret, once, quote(once, safe="")})

    def hide(self, text: str) -> str:
        if self.show_secrets:
            return text
        for pattern in _TOKEN_PARAMS:
            text = pattern.sub(r"\1***", text)
        return redact(text, sorted(self.secrets, key=len, reverse=True))

    def __call__(self, text: str = "", err: bool = False) -> None:
        click.echo(self.hide(text), err=err)

    def fail(self, message: str, code: int = 1) -> NoReturn:
        self(f"relay: {message}", err=True)
        sys.exit(code)


# --- commands -------------------------------------------------------------------------------------

def _settings(out: Out, required: Sequence[str]) -> Settings:
    try:
        settings = Settings.from_env()
    except SettingsError as exc:
        out.fail(str(exc), 2)
    out.add_secrets(t.get() for t in settings.listener_tokens)
    try:
        return settings.require(*required)
    except SettingsError as exc:
        out.fail(str(exc), 2)




class _Calls:
    """The Optimove calls of one command: retried, errors turned into a clean exit (token hidden)."""

    def __init__(self, settings: Settings, out: Out):
        self.client = client_for(settings)
        self.out = out

    def __enter__(self) -> "_Calls":
        return self

    def __exit__(self, *exc) -> None:
        self.client.close()

    def call(self, function: str, run, done: str = "") -> Any:
        from shared.optimove.client import OptimoveError
        from shared.optimove.setup import call_with_retry

        try:
            return call_with_retry(run)
        except OptimoveError as exc:
            self.out.fail(f"{function} failed: {exc.reason}" + (f"\n{done}" if done else ""))
        except redis_errors() as exc:
            self.out.fail(f"REDIS_URL: the shared Optimove rate limit is unreachable ({type(exc).__name__}: {exc}); "
                          "start that Redis, or unset REDIS_URL to limit this command in-process only"
                          + (f"\n{done}" if done else ""))

    def registered(self) -> list[Registered]:
        data = self.call(LIST, lambda: self.client.get(CATEGORY, LIST))
        try:
            found, unreadable = parse_registered(data)
        except ValueError as exc:
            self.out.fail(f"{LIST}: {exc}")
        for row in unreadable:
            self.out(f"warning: {LIST} returned an entry without a readable EventTypeID and ListenerURL, "
                     f"left alone: {json.dumps(row, ensure_ascii=False)}", err=True)
        return found

    def register(self, listener: Listener, url: str, done: str) -> None:
        self.call(REGISTER, lambda: self.client.post(CATEGORY, REGISTER, listener.body(url)), done)

    def unregister(self, event: int, channel: int | None) -> None:
        body: dict[str, Any] = {"EventTypeID": event}
        if channel is not None:
            body["ChannelID"] = channel
        self.call(UNREGISTER, lambda: self.client.post(CATEGORY, UNREGISTER, body))


def _count(n: int, noun: str = "listener") -> str:
    return f"{n} {noun}{'' if n == 1 else 's'}"


def print_plan(out: Out, plan: Plan) -> None:
    """Every wanted listener with what is (or would be) done, and registrations outside the config."""
    out(f"ListenerURL: {plan.url}")
    for step in plan.steps:
        if step.action == "ok":
            out(f"  already right   {step.listener}")
        elif step.current is None:
            out(f"  to register     {step.listener}: not registered")
        else:
            out(f"  to register     {step.listener}: registered with another URL {step.current}")
    for entry in plan.extra:
        out(f"  not in config   {entry.listener}: {entry.url} (left alone; remove it with "
            f"relay listeners unregister --event {entry.listener.event}"
            + (f" --channel {entry.listener.channel}" if entry.listener.channel is not None else "") + ")")


@click.group()
def listeners() -> None:
    """Optimove event listeners (setup step): register the relay's listener URL, list, unregister.

    Needs OPTIMOVE_API_URL and OPTIMOVE_API_KEY; `register` also RELAY_PUBLIC_URL and
    RELAY_LISTENER_TOKENS (the first token goes in the URL) and reads RELAY_CHANNEL_CONFIG.
    No database. Calls respect OPTIMOVE_RATE_LIMIT, shared through Redis when REDIS_URL is set.
    The token is shown as *** unless --show-secrets.
    """


@listeners.command("register", short_help="register the listener URL for what the channel config asks for")
@click.option("--dry-run", is_flag=True, help="print the plan; register nothing (only reads Optimove's list)")
@click.option("--show-secrets", is_flag=True, help="show the listener token in URLs")
def listeners_register(dry_run: bool, show_secrets: bool) -> None:
    """Register RELAY_PUBLIC_URL/optimove/events?token=<first token> for what the channel config asks for.

    Per configured channel: each EventTypeID of its "events" (default [13]) with its ChannelID;
    EventTypeID 4 without a channel; EventTypeID 5 without a channel when "conditional": true.
    Only what is missing or registered with another URL is registered (again); running it twice
    registers nothing the second time. Registrations the config does not ask for are left alone.
    """
    out = Out(show_secrets)
    settings = _settings(out, REGISTER_SETTINGS)
    url = listener_url(settings.public_url, settings.listener_tokens[0].get())
    if not settings.channels.roles and not settings.channels.events:
        out("note: the channel config lists no channels (RELAY_CHANNEL_CONFIG"
            + (")" if settings.channel_config_path else " is unset)") + "; only channel-less event types apply",
            err=True)
    with _Calls(settings, out) as calls:
        plan = plan_listeners(settings.channels, calls.registered(), url)
        if dry_run:
            out("dry run:")
            print_plan(out, plan)
            out(f"dry run: {_count(len(plan.to_register))} would be registered, {len(plan.already_right)} "
                f"already right, {len(plan.extra)} not in the config left alone; nothing was changed")
            return
        out(f"ListenerURL: {url}")
        done_steps: list[Step] = []
        for step in plan.steps:
            if step.action == "ok":
                out(f"  already right   {step.listener}")
                continue
            done = (f"{_count(len(done_steps))} registered before it; run the same command again once the cause "
                    "is fixed (it registers only what is still missing)")
            calls.register(step.listener, url, done)
            done_steps.append(step)
            out(f"  registered      {step.listener}" + (f", was {step.current}" if step.current else ""))
        for entry in plan.extra:
            out(f"  not in config   {entry.listener}: {entry.url} (left alone)")
        if done_steps:
            check = plan_listeners(settings.channels, calls.registered(), url)
            wrong = [s for s in check.to_register if s.listener in {d.listener for d in done_steps}]
            if wrong:
                for step in wrong:
                    out(f"  NOT registered  {step.listener}: Optimove lists "
                        + (step.current if step.current else "nothing"), err=True)
                out.fail(f"{_count(len(wrong))} registered but not listed by {LIST} with this URL afterwards")
    out(f"registered {_count(len(done_steps))}, {len(plan.already_right)} already right, "
        f"{len(plan.extra)} not in the config left alone")


def _table(out: Out, entries: Sequence[Registered]) -> None:
    if not entries:
        return
    out(f"{'EventTypeID':>11}  {'ChannelID':>9}  ListenerURL")
    for entry in entries:
        channel = "-" if entry.listener.channel is None else str(entry.listener.channel)
        out(f"{entry.listener.event:>11}  {channel:>9}  {entry.url}")


@listeners.command("list", short_help="the listeners registered with Optimove")
@click.option("--json", "as_json", is_flag=True, help="print the JSON array Optimove returned")
@click.option("--show-secrets", is_flag=True, help="show the listener token in URLs")
def listeners_list(as_json: bool, show_secrets: bool) -> None:
    """The listeners registered with Optimove (GetRegisteredEventListeners)."""
    out = Out(show_secrets)
    settings = _settings(out, OPTIMOVE_SETTINGS)
    with _Calls(settings, out) as calls:
        if as_json:
            data = calls.call(LIST, lambda: calls.client.get(CATEGORY, LIST))
            out(json.dumps([] if data is None else data, indent=2, ensure_ascii=False))
            return
        entries = sorted(calls.registered(), key=lambda e: _order(e.listener))
    _table(out, entries)
    out(f"{_count(len(entries))} registered")


@listeners.command("unregister", short_help="stop Optimove reporting an event type (or one channel's)")
@click.option("--event", "event", type=click.IntRange(min=1), required=True, help="EventTypeID")
@click.option("--channel", "channel", type=click.IntRange(min=1), default=None,
              help="ChannelID (without it: every registration of the event type)")
@click.option("--show-secrets", is_flag=True, help="show the listener token in URLs")
def listeners_unregister(event: int, channel: int | None, show_secrets: bool) -> None:
    """Stop Optimove reporting EventTypeID N (UnregisterEventListener), or only for channel C.

    Lists before and after the call and prints what was removed. Optimove documents the call
    with EventTypeID only; whether it honours ChannelID is unconfirmed, so if it removed other
    channels' registrations too, they are named (register them again with `relay listeners register`).
    """
    out = Out(show_secrets)
    settings = _settings(out, OPTIMOVE_SETTINGS)
    target = Listener(event, channel)
    what = str(target) if channel is not None else f"EventTypeID {event} (every channel)"
    with _Calls(settings, out) as calls:
        before = calls.registered()
        matching = [e for e in before if e.listener.event == event
                    and (channel is None or e.listener.channel == channel)]
        if not matching:
            out(f"nothing registered for {what}; 0 listeners unregistered")
            return
        calls.unregister(event, channel)
        after = {(e.listener, e.url) for e in calls.registered()}
    removed = [e for e in before if (e.listener, e.url) not in after]
    for entry in removed:
        out(f"  unregistered    {entry.listener}: {entry.url}")
    left = [e for e in matching if (e.listener, e.url) in after]
    others = [e for e in removed if e not in matching]
    if others:
        out(f"warning: Optimove also removed {_count(len(others))} not asked for; `relay listeners register` "
            "registers the configured ones again", err=True)
    if left:
        out.fail(f"{UNREGISTER} for {what} returned OK but {LIST} still lists {_count(len(left))}")
    out(f"{_count(len(removed))} unregistered ({what})")
